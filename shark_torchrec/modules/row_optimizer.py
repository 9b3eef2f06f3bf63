"""The row optimizer of a `RowGroupStore`, with the priority update of paper Eq. 7.

At each step the touched rows' priorities are updated (Eq. 7, or its gradient-weighted
variant), then the rows themselves: row-wise Adagrad (FBGEMM's EXACT_ROWWISE_ADAGRAD) or SGD,
the same rule in every group, each row read from its group table, stepped in fp32 and
written back with stochastic rounding for fp16 and integer rows: on CPU in one pass of our
C++ op (`torch.ops.shark.update_rows_hashed_`), elsewhere by the torch code that is its
reference. Dropped rows' gradients are summed into their table's fallback row, stepped at the
end of the step (`apply_fallback_update`). On CPU, where no row needs those steps apart
(`can_fuse_backward`), the lookup's backward hands the output gradient to
`apply_fused_update` instead: the per-row gradient sums, the optimizer and the row update in
one op (`torch.ops.shark.row_grads_update_`), then Eq. 7.

Kept apart from the tier layout (`shark_torchrec.modules.row_groups`, which imports this module)
and the lookup (`shark_torchrec.modules.row_lookup`, whose backward calls `apply_update` or
`apply_fused_update`).
This module imports nothing of the store: `RowOptimizer` is a mixin that reaches the store's
state through `self`.
"""

from __future__ import annotations

import time

import torch

from shark_torchrec.kernels import (
    POOLING_CODES,
    fused_backward_agrees,
    row_grads_update_,
    rowwise_adagrad_scales_,
    update_priorities_,
    update_rows_hashed_,
)
from shark_torchrec.modules.row_lookup import kernels_for
from shark_torchrec.precision.priority import DROPPED, FP32, decay_table, updated
from shark_torchrec.precision.quantize import _noise_table, noise_head, round_bf16_stochastic, state_noise_bits

_SQUARES_SCRATCH = 1 << 20  # values in `_mean_squares`'s scratch buffer (4 MB in fp32)


class RowOptimizer:
    """The optimizer step and Eq. 7 of a `RowGroupStore` (mixed into it; not usable alone).

    Reads of the store: `policy`, `step` (`value`), `has_dropped`, and its layout through
    `groups_of`, `table_of_rows`, `grouping`, `group_view`, `_dequantize`, `noise_starts`,
    `_noise_rows` (a bf16 optimizer state's rounding noise),
    `fallback_slot0`, and the buffers the fused update reads (`op_layout`, `table_base` and the
    tables' ids and offsets, `dim`, `row_alignment`). Writes: `row_priority`,
    `row_seen_step`, `priority_seconds`, `nonfinite_rows`, `momentum`, `fallback_grad`,
    `fallback_momentum`, the rows' bytes in the group tables (through `_round_into`, with
    stochastic rounding, and the fp32 fallback rows directly), and `_squares_scratch`, the
    scratch buffer `_mean_squares` keeps between steps (no state: never saved).
    """

    @torch.no_grad()
    def apply_update(self, keys: torch.Tensor, row_grad: torch.Tensor, total: torch.Tensor, pos: torch.Tensor) -> None:
        """The touched rows' priorities (Eq. 7), then their optimizer step.

        Args:
            keys: [U] the distinct row keys the batch read.
            row_grad: [U, dim] each row's gradient, summed over its ids.
            total: [U] float each row's count of ids.
            pos: [U] float each row's count of ids with a positive label.
        """
        step = self.step.value
        p = self.policy
        if p.scored and len(keys):
            t0 = time.perf_counter()
            neg = total - pos
            if p.signal == "eq7-grad":
                # The step's occurrences weighted by how much the loss moved the row.
                norm = torch.nan_to_num(row_grad.norm(dim=1), nan=0.0, posinf=0.0)
                pos, neg = pos * norm, neg * norm
            if kernels_for(self) == "cpp":  # one op, bit for bit the torch code below
                # (a replicated table's sums arrive as strided columns of one buffer)
                self._update_priorities_op(keys, pos.float().contiguous(), neg.float().contiguous(), step)
            else:
                # index_select / index_copy_ / index_fill_ move the same values as indexing, in
                # half the time of `x[keys]` and `x[keys] = v` here.
                self.row_priority.index_copy_(
                    0,
                    keys,
                    updated(
                        self.row_priority.index_select(0, keys),
                        self.row_seen_step.index_select(0, keys),
                        step,
                        pos,
                        neg,
                        p.effective_alpha,
                        p.beta,
                    ),
                )
                self.row_seen_step.index_fill_(0, keys, step)
            self.priority_seconds += time.perf_counter() - t0
        kernels = kernels_for(self)
        # A NaN or inf anywhere makes a row's sum, and its mean square, non-finite. Adagrad
        # needs the mean squares anyway, so they serve the check: they also catch a finite
        # gradient whose square overflows (|g| above about 1e19), which would otherwise set the
        # row's state to inf and stop the row for good.
        adagrad = p.optimizer == "rowwise_adagrad"
        mean_sq = self._mean_squares(row_grad) if adagrad else None
        finite = torch.isfinite(mean_sq if adagrad else row_grad.sum(dim=1))
        if not bool(finite.all()):
            # A non-finite gradient would poison the row (and its int8 scale): skip it.
            self.nonfinite_rows += int((~finite).sum())
            keys, row_grad = keys[finite], row_grad[finite]
            if adagrad:
                mean_sq = mean_sq[finite]
        if self.has_dropped:
            dropped = self.groups_of(keys) == DROPPED
            if bool(dropped.any()):
                # A dropped id's gradient is its table's fallback row's: summed here, applied
                # at the end of the step (`apply_fallback_update`, after the module has summed
                # the shards of row-split tables).
                self.fallback_grad.index_add_(0, self.table_of_rows(keys[dropped]), row_grad[dropped])
                keys, row_grad = keys[~dropped], row_grad[~dropped]
                if adagrad:
                    mean_sq = mean_sq[~dropped]
        if not len(keys):
            return
        if adagrad and kernels == "cpp" and self.momentum.dtype == torch.float32:
            # One op for the state and the scales, bit for bit `_step_scale`'s torch code.
            scale = rowwise_adagrad_scales_(self.momentum, keys.contiguous(), mean_sq, p.learning_rate, p.eps)
        else:
            scale = self._step_scale(self.momentum, keys, row_grad, mean_sq)
        self.step_rows(keys, row_grad, scale, step, kernels=kernels)

    def can_fuse_backward(self) -> bool:
        """Whether this step's backward may run as one op (`apply_fused_update`).

        Returns:
            True on the C++ ops (CPU) for a store without dropped rows (their gradients go to
            their table's fallback row), with SGD or an fp32 Adagrad state (a bf16 one is
            rounded with noise of its own), under Eq. 7 (its gradient-weighted variant reads
            the rows' gradient norms), and where this torch sums a row in the order the op
            was written for (`fused_backward_agrees`). Data-parallel tables sum their
            gradients across ranks first: the lookup does not ask for them.
        """
        p = self.policy
        return (
            kernels_for(self) == "cpp"
            and not self.has_dropped
            and p.signal != "eq7-grad"
            and (p.optimizer == "sgd" or self.momentum.dtype == torch.float32)
            and fused_backward_agrees(self.dim)
        )

    @torch.no_grad()
    def apply_fused_update(
        self,
        keys: torch.Tensor,
        counts: torch.Tensor,
        grad: torch.Tensor,
        order: torch.Tensor,
        seg: torch.Tensor,
        lengths: torch.Tensor,
        per_sample_weights,
        labels,
        batch_size: int,
        pooling: str,
    ) -> None:
        """The step of every row the batch read, straight from the output gradient
        (`torch.ops.shark.row_grads_update_`), then their priorities (Eq. 7): what
        `RowLookup._row_grads_torch` then `apply_update` do, bit for bit, without a
        [rows, dim] gradient. Only where `can_fuse_backward()`.

        Args:
            keys, counts, order, seg: `ids_by_row`'s distinct row keys, their ids' counts, the
                ids sorted by row and each id's bag.
            grad: the lookup's output gradient.
            lengths, per_sample_weights, labels, batch_size: the batch's, as the lookup saw it.
            pooling: "sum", "mean" or "none".
        """
        step = self.step.value
        p = self.policy
        adagrad = p.optimizer == "rowwise_adagrad"
        pos, skipped = row_grads_update_(
            *self.op_layout,
            keys,
            grad,
            order,
            counts,
            seg,
            lengths,
            per_sample_weights,
            labels,
            batch_size,
            POOLING_CODES[pooling],
            self.momentum if adagrad else torch.empty(0),
            p.learning_rate,
            p.eps,
            self.table_base,
            self._table_ids,
            self._row_offset,
            self._col_offset,
            noise_head(p.seed, step),
            _noise_table(self.weights.device),
            self.dim,
            self.row_alignment,
        )
        self.nonfinite_rows += int(skipped)
        if p.scored and len(keys):
            t0 = time.perf_counter()
            self._update_priorities_op(keys, pos, counts.float() - pos, step)
            self.priority_seconds += time.perf_counter() - t0

    def _update_priorities_op(self, keys: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, step: int) -> None:
        """Eq. 7 for the rows `keys` at `step` by our C++ op, in place (`update_priorities_`)."""
        p = self.policy
        decay = decay_table(p.beta, step)  # seen steps are >= 0: no row waits longer
        update_priorities_(
            self.row_priority, self.row_seen_step, keys.contiguous(), pos, neg, step, p.effective_alpha, p.beta, decay
        )

    def _mean_squares(self, row_grad: torch.Tensor) -> torch.Tensor:
        """(row_grad * row_grad).mean(dim=1), bit for bit, with the squares made a block of rows
        at a time in a scratch buffer of at most 2^20 values kept between steps: a fresh
        [n, dim] temporary each step cost up to several times the multiplication itself in page
        faults (for 41,557 rows at dim 64, 0.8-2.4 ms against 0.65-0.7 ms with the scratch:
        medians of 200 timings, two runs). Each row's mean is torch's own reduction of that
        row, whatever the block."""
        n, d = row_grad.shape
        block = max(1, min(n, _SQUARES_SCRATCH // max(d, 1)))
        scratch = getattr(self, "_squares_scratch", None)
        if (
            scratch is None
            or scratch.numel() < block * d
            or scratch.dtype != row_grad.dtype
            or scratch.device != row_grad.device
        ):
            scratch = torch.empty(block * d, dtype=row_grad.dtype, device=row_grad.device)
            self._squares_scratch = scratch
        mean_sq = torch.empty(n, dtype=row_grad.dtype, device=row_grad.device)
        for a in range(0, n, block):
            rows = row_grad[a : a + block]
            squares = torch.mul(rows, rows, out=scratch[: len(rows) * d].view(len(rows), d))
            torch.mean(squares, dim=1, out=mean_sq[a : a + len(rows)])
        return mean_sq

    def step_rows(
        self, keys: torch.Tensor, row_grad: torch.Tensor, scale: torch.Tensor, step: int, kernels: str
    ) -> None:
        """Rows `keys` (distinct, stored) become old - row_grad * scale, written back in their
        groups with `step`'s stochastic rounding.

        Args:
            keys: [n] row keys.
            row_grad: [n, dim] gradients.
            scale: [n] what each gradient is multiplied by.
            step: the step whose rounding noise is used.
            kernels: "cpp", one pass of our C++ op (`torch.ops.shark.update_rows_hashed_`, CPU);
                "triton", the same in Triton (`shark_torchrec.triton_kernels.update_rows_`,
                CUDA); "torch", the torch code below, their reference (all agree bit for bit).
        """
        if kernels == "cpp":  # the noise windows hashed in the op's pass
            update_rows_hashed_(
                *self.op_layout,
                keys,
                row_grad,
                scale,
                self.table_base,
                self._table_ids,
                self._row_offset,
                self._col_offset,
                noise_head(self.policy.seed, step),
                _noise_table(self.weights.device),
                self.dim,
                self.row_alignment,
            )
            return
        if kernels == "triton":
            from shark_torchrec.triton_kernels import update_rows_ as fused_update

            start, table = self.noise_starts(keys, step)
            fused_update(*self.op_layout, keys, row_grad, scale, table, start, self.dim, self.row_alignment)
            return
        # Group by group: read the rows, step, round back (no full-size gather and scatter).
        for grp, (pos, slots) in enumerate(self.grouping(keys)):
            if not len(pos):
                continue
            view = self.group_view(grp)
            new = self._dequantize(grp, view, slots) - row_grad[pos] * scale[pos][:, None]
            self._round_into(grp, view, slots, new, keys[pos], step)

    def _step_scale(
        self, momentum: torch.Tensor, index: torch.Tensor, grad: torch.Tensor, mean_sq: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per row, what its gradient is multiplied by in this step's update: row-wise Adagrad
        (FBGEMM's EXACT_ROWWISE_ADAGRAD: `momentum[index]` += mean(g^2), then lr / (sqrt(m) +
        eps)) or SGD (lr). Shared by the rows and the fallback rows. A bf16 state (the rows',
        under `momentum_dtype="bf16"`; `index` then holds row keys) is summed in fp32 and
        stored with stochastic rounding, its noise hashed from (seed, step, table, global
        row) so that every replica and column slice of a row, and a resumed run, round alike;
        the step uses the unrounded sum. `mean_sq`, when given, is (grad * grad).mean(dim=1),
        already computed (`torch.ops.shark.rowwise_adagrad_scales_` is this code's fp32 case)."""
        p = self.policy
        if p.optimizer == "rowwise_adagrad":
            if mean_sq is None:
                mean_sq = (grad * grad).mean(dim=1)
            m = momentum.index_select(0, index).float() + mean_sq
            if momentum.dtype == torch.bfloat16:
                t, rows = self._noise_rows(index)
                bits = state_noise_bits(p.seed, self.step.value, self._table_ids[t], rows)
                momentum.index_copy_(0, index, round_bf16_stochastic(m, bits))
            else:
                momentum.index_copy_(0, index, m)
            return p.learning_rate / (m.sqrt() + p.eps)
        return torch.full((len(index),), p.learning_rate)

    @torch.no_grad()
    def apply_fallback_update(self) -> None:
        """The step's update of every table's fallback row from the summed gradients of its
        dropped ids (the same optimizer as the rows; exact, fp32). The module calls it at the
        end of the step, once `fallback_grad` holds the sum over all shards of the table."""
        if not self.has_dropped:
            return
        touched = (self.fallback_grad != 0).any(dim=1).nonzero().flatten()
        if len(touched):
            g = self.fallback_grad[touched]
            scale = self._step_scale(self.fallback_momentum, touched, g)
            view = self.group_view(FP32)
            slots = self.fallback_slot0 + touched
            view[slots] = view[slots] - g * scale[:, None]
        self.fallback_grad.zero_()

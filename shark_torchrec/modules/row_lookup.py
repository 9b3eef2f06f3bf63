"""The lookup of a `RowGroupStore` and its autograd.

The forward reads every id's row from the store's group tables in one call: on CPU our fused
op (`torch.ops.shark.mixed_lookup`), elsewhere FBGEMM's mixed-precision inference TBE
(`group_lookup`), pooled here; the backward (`_Lookup`, an autograd Function, since FBGEMM
trains none of this) turns the output gradient into per-row gradients, occurrence counts and
positive-label counts, sums them over replicas for data-parallel tables, and hands them to the
optimizer (`apply_update`, `shark_torchrec.modules.row_optimizer`).

Kept apart from the tier layout (`shark_torchrec.modules.row_groups`, which imports this module)
so that the layout, the lookup and the row optimizer can each be read on their own. This module
imports nothing of the store: `RowLookup` is a mixin that reaches the store's state through
`self`. The group tables' FBGEMM types (`_TYPES`, `GROUPS`) are defined here, with the op that
reads them, and imported by the layout.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.distributed as dist

from shark_torchrec.kernels import POOLING_CODES
from shark_torchrec.kernels import mixed_lookup as cpp_mixed_lookup
from shark_torchrec.kernels.reference import GROUP_TYPES as _TYPES
from shark_torchrec.kernels.reference import group_lookup
from shark_torchrec.precision.labels import split_tagged

GROUPS = len(_TYPES)  # group tables in every buffer, in group-id order


class _Lookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor, store, values, lengths, weights, batch_size):  # type: ignore[override]
        out, saved = store._forward(values, lengths, weights, batch_size)
        ctx.store = store
        ctx.saved = saved
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if ctx.store.training_enabled:
            ctx.store._backward(ctx.saved, grad)
        # A gradient for the step anchor (empty): its arrival marks the end of the step.
        return (torch.zeros(0),) + (None,) * 5


KERNELS = ("cpp", "triton", "torch")
_warned_no_triton = False


def kernels_for(store) -> str:
    """Which implementation runs a store's lookup and row update.

    Args:
        store: the `RowGroupStore`; its `kernels` ("cpp", "triton" or "torch") wins when set
            (the tests run "triton" on CPU through Triton's interpreter).

    Returns:
        "cpp" (our C++ ops) on CPU; "triton" (`shark_torchrec.triton_kernels`) on CUDA, or
        "torch" there with a warning when triton is not installed; "torch" (the FBGEMM lookup
        and the torch update, the ops' reference) on other devices.
    """
    global _warned_no_triton
    if store.kernels is not None:
        if store.kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, not {store.kernels!r}")
        return store.kernels
    device = store.weights.device.type
    if device == "cpu":
        return "cpp"
    if device == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            if not _warned_no_triton:
                warnings.warn(
                    "triton is not installed: mixed-precision rows on CUDA use FBGEMM's lookup and the "
                    "torch update, not the fused Triton kernels (pip install triton)",
                    stacklevel=2,
                )
                _warned_no_triton = True
            return "torch"
        return "triton"
    return "torch"


class RowLookup:
    """The forward and backward of a `RowGroupStore` (mixed into it; not usable alone).

    Reads of the store: `feature_names`, `feature_base`, `dim`, `pooling`, `label_tagged`,
    `weighted`, `policy` (`scored`), `training_enabled`, `step` (`anchor`, and
    `warned_no_labels`, which it sets once), `map_values` with `_decode_map` and
    `_lookup_groups`, the group tables (`weights`) with the op buffers (`op_layout` for the
    fused ops; `_op_offsets`, `_op_tys`, `_op_D_offsets`, `_op_placements` for FBGEMM's) and
    `row_alignment`; for data-parallel
    tables `replicated_pg`. It writes no store state itself: the backward ends in the store's
    `apply_update` (`RowOptimizer`), which updates the rows; or, on CPU where the store's
    `can_fuse_backward()` is true, in its `apply_fused_update`, which also sums the rows'
    gradients.
    """

    # ------------------------------------------------------------------ lookup
    def forward(
        self,
        values: torch.Tensor,
        lengths: torch.Tensor,
        weights: Optional[torch.Tensor],
        batch_size: int,
    ) -> torch.Tensor:
        if (
            weights is None
            and self.label_tagged
            and self.policy.scored
            and self.training_enabled
            and torch.is_grad_enabled()
        ):
            self._warn_no_labels()  # (autograd runs _forward with grad off: checked here)
        return _Lookup.apply(self.step.anchor, self, values, lengths, weights, batch_size)

    def _forward(self, values, lengths, weights, B):
        """Every id's row, pooled: on CPU one call of our fused op (`torch.ops.shark.mixed_lookup`,
        which agrees bit for bit with the FBGEMM path below); elsewhere FBGEMM's INT-N TBE.
        Returns the output and what the backward needs (the backward works out each id's bag
        and row key itself: an evaluation's forward, which has no backward, does not pay for them)."""
        values = values.long()
        lengths = lengths.long()
        labels = None
        psw = None
        if weights is not None:
            if self.label_tagged:
                real, labels = split_tagged(weights)
                if self.weighted:
                    psw = real
            elif self.weighted:
                psw = weights
        saved = (values, psw, labels, lengths, B)
        kernels = kernels_for(self)
        if kernels in ("cpp", "triton"):
            if kernels == "triton":
                from shark_torchrec.triton_kernels import mixed_lookup
            else:
                mixed_lookup = cpp_mixed_lookup
            # The two ops take the same arguments.
            out = mixed_lookup(
                *self.op_layout,
                self.feature_base,
                self.feature_rows,
                values,
                lengths,
                None if self.pooling == "none" else psw,
                self.dim,
                B,
                self.pooling,
                self.row_alignment,
                list(self.feature_names),
            )
            return out, saved
        return self._forward_fbgemm(values, lengths, self._bags_and_keys(values, lengths, B)[1], psw, B), saved

    def _bags_and_keys(self, values, lengths, B):
        """Each id's bag (feature-major) and row key (ids were checked by the collection)."""
        seg = torch.repeat_interleave(torch.arange(len(self.feature_names) * B), lengths)
        return seg, self.feature_base[seg // B] + values

    def _forward_fbgemm(self, values, lengths, keys, psw, B):
        """The lookup through FBGEMM's mixed-precision inference TBE, pooled here (the path on
        GPUs, and the fused op's reference).

        The ids are sorted by group; the TBE sees five sequence features (one per group
        table, every id a bag of one) and returns one row per id. Pooling the rows here,
        rather than asking the TBE for a pooled output per (feature, group), keeps the output
        at the size of the ids instead of three times the pooled output (which, zero-filled
        every step, cost more than the lookup itself on CPU).
        """
        F, D = len(self.feature_names), self.dim
        nnz = values.numel()
        g, key_slots = self._decode_map(self.map_values(keys))
        g = self._lookup_groups(g)
        perm = torch.argsort(g, stable=True)
        per_group = torch.bincount(g.long(), minlength=GROUPS)
        bags = max(int(per_group.max()), 1) if nnz else 1
        # Offsets of 5 features x `bags` bags: group k's ids are its first per_group[k] bags.
        ends = (
            torch.arange(1, bags + 1, dtype=torch.int64)[None, :].clamp(max=per_group[:, None])
            + (torch.cumsum(per_group, 0) - per_group)[:, None]
        )
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), ends.flatten()])
        rows = group_lookup(
            self.weights,
            self._op_offsets,
            self._op_tys,
            self._op_D_offsets,
            self._op_placements,
            D,
            key_slots[perm],
            offsets,
            self.row_alignment,
        )
        per_id = torch.empty_like(rows)
        per_id[perm] = rows  # back to the input order
        if self.pooling == "none":
            return per_id
        if psw is not None:
            per_id = per_id * psw[:, None]
        if nnz == F * B and bool((lengths == 1).all()):
            pooled = per_id  # one id a bag (the common DLRM case): nothing to add up
        else:
            pooled = (
                torch.segment_reduce(per_id, "sum", lengths=lengths, axis=0, unsafe=True)
                if F * B
                else per_id.new_zeros(0, D)
            )
        if self.pooling == "mean":
            pooled = pooled / lengths.clamp_min(1).to(pooled.dtype)[:, None]
        return pooled.view(F, B, D).transpose(0, 1).reshape(B, F * D)

    def _warn_no_labels(self) -> None:
        if self.step.warned_no_labels:
            return
        self.step.warned_no_labels = True
        warnings.warn(
            "mixed-precision embedding collection: a training batch carries no labels, so paper Eq. 7 falls "
            "back to counting occurrences (every id counts as a negative). Feed batches through "
            "shark_torchrec.distributed.train_pipeline.LabelTaggingTrainPipeline, or tag the ids with "
            "shark_torchrec.precision.labels.tag_labels(kjt, labels).",
            stacklevel=3,
        )

    # ------------------------------------------------------------------ backward
    def _backward(self, saved, grad: torch.Tensor) -> None:
        values, psw, labels, lengths, B = saved
        # Ids sorted by row: each row's gradient is then the sum of a contiguous run.
        if grad.device.type == "cpu" and kernels_for(self) != "torch":
            seg, order, uniq, counts = torch.ops.shark.ids_by_row(values, lengths, self.feature_base, B)
            if self.replicated_pg is None and self.can_fuse_backward():
                # One op from the output gradient to the stepped rows (bit for bit the steps
                # below): no [rows, dim] gradient made, written and read again.
                self.apply_fused_update(uniq, counts, grad, order, seg, lengths, psw, labels, B, self.pooling)
                return
            row_grad, pos = torch.ops.shark.row_grads(
                grad.float(), order, counts, seg, lengths, psw, labels, B, POOLING_CODES[self.pooling], self.dim
            )
        else:
            seg, order, uniq, counts = self._ids_by_row_torch(values, lengths, B)
            row_grad, pos = self._row_grads_torch(grad, order, counts, seg, lengths, psw, labels, B)
        total = counts.float()
        if self.replicated_pg is not None:
            uniq, row_grad, total, pos = self._sum_replicas(uniq, row_grad, total, pos)
        self.apply_update(uniq, row_grad, total, pos)

    def _ids_by_row_torch(self, values, lengths, B):
        """Each id's bag, the ids in a stable sort by row key, the distinct keys and their ids'
        counts: the torch code of `torch.ops.shark.ids_by_row` (its reference, and the path on
        other devices)."""
        seg, keys = self._bags_and_keys(values, lengths, B)
        order = torch.argsort(keys, stable=True)
        uniq, counts = torch.unique_consecutive(keys[order], return_counts=True)
        return seg, order, uniq, counts

    def _row_grads_torch(self, grad, order, counts, seg, lengths, psw, labels, B):
        """Per distinct row (in `order`'s runs of `counts`), its gradient summed over its ids and
        its count of positive labels: the torch code of `torch.ops.shark.row_grads` (its
        reference, and the path on other devices)."""
        F, D = len(self.feature_names), self.dim
        if self.pooling == "none":
            per_id = grad[order]
        else:
            s = seg[order]
            # grad is [B, F * D]: bag (f, b) is row b, columns f * D ... (f + 1) * D.
            per_id = grad.reshape(B * F, D)[(s % B) * F + s // B]
            if self.pooling == "mean":
                per_id = per_id / lengths[s].clamp_min(1).to(per_id.dtype)[:, None]
        if psw is not None:
            per_id = per_id * psw[order][:, None]
        U = len(counts)
        run = torch.repeat_interleave(torch.arange(U), counts)  # sorted: index_add is fast
        row_grad = torch.zeros(U, D).index_add_(0, run, per_id.float())
        pos = torch.zeros(U).index_add_(0, run, labels[order]) if labels is not None else torch.zeros(U)
        return row_grad, pos

    def _sum_replicas(self, uniq, row_grad, total, pos):
        """Data-parallel tables: every replica sees only its own batch, so gradients and
        counts are summed over ranks (gradients averaged, as DDP would) before anyone
        updates; then every replica applies the same update. Only the touched rows travel:
        each rank gathers every rank's (row, gradient, count, positives) and sums them per row
        in rank order, so no buffer the size of the table is made (an all-reduce of a dense
        [rows, dim + 2] buffer did that every step)."""
        pg = self.replicated_pg
        world = dist.get_world_size(pg)
        D = self.dim
        payload = torch.cat([row_grad, total[:, None], pos[:, None]], dim=1)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([len(uniq)], dtype=torch.int64), group=pg)
        counts = [int(c) for c in sizes]
        most = max(counts)
        keys_pad = torch.full((most,), -1, dtype=torch.int64)
        keys_pad[: len(uniq)] = uniq
        payload_pad = torch.zeros(most, D + 2)
        payload_pad[: len(uniq)] = payload
        all_keys = [torch.empty_like(keys_pad) for _ in range(world)]
        all_payloads = [torch.empty_like(payload_pad) for _ in range(world)]
        dist.all_gather(all_keys, keys_pad, group=pg)
        dist.all_gather(all_payloads, payload_pad, group=pg)
        keys = torch.cat([k[:c] for k, c in zip(all_keys, counts)])
        payloads = torch.cat([p[:c] for p, c in zip(all_payloads, counts)])
        touched, inverse = torch.unique(keys, sorted=True, return_inverse=True)
        d = torch.zeros(len(touched), D + 2).index_add_(0, inverse, payloads)
        return touched, d[:, :D] / world, d[:, D], d[:, D + 1]

"""The rows of one or more embedding tables kept in fp32, fp16, int8, int4 and int2 groups.

A `RowGroupStore` is what one rank holds of a set of tables (whole tables, row ranges or
column slices): per row a group tag and a slot (the row map), and one FBGEMM inference
table-batched embedding buffer with five tables, one per group (empty for groups the policy
does not use). Lookups read it with our fused op on CPU (`torch.ops.shark.mixed_lookup`) and
FBGEMM's mixed-precision forward elsewhere (`int_nbit_split_embedding_codegen_lookup_function`,
which reads fp32, fp16, int8, int4 and int2 rows in one call); the two agree bit for bit.
FBGEMM trains none of this, so the backward pass is ours: per-row gradients, the optimizer
(row-wise Adagrad or SGD, the same rule in every group), and a write back with stochastic
rounding for fp16 and integer rows. No fp32 copy of a low-precision row exists outside the
rows being updated at this step.

The store has no distributed state except, for replicated (data-parallel) tables, the
process group over which gradients and counts are summed.

This module holds the tier layout: the store's state, the group tables and the row map, the
moves between groups, and reading and writing rows. The lookup and its autograd are in
`shark_torchrec.modules.row_lookup` (`RowLookup`), the optimizer with Eq. 7 in
`shark_torchrec.modules.row_optimizer` (`RowOptimizer`): mixins that `RowGroupStore`
inherits. `group_lookup` is importable from here as before.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)
import torch
import torch.distributed as dist
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
from torch import nn

from shark_torchrec.kernels import changed_rows, convert_rows_
from shark_torchrec.modules.precision_policy import PrecisionPolicy
from shark_torchrec.modules.row_lookup import (
    _TYPES,
    GROUPS,
    RowLookup,
    group_lookup,  # noqa: F401  (re-exported: inference imports it from here)
    kernels_for,
)
from shark_torchrec.modules.row_optimizer import RowOptimizer
from shark_torchrec.precision.priority import (
    DROPPED,
    FP16,
    FP32,
    GROUP_NAMES,
    INT_BITS,
    ROW_MAP_BYTES,
    decayed,
    row_bytes,
)
from shark_torchrec.precision.quantize import (
    dequantize_rows,
    pack_codes,
    quantize_rows,
    requantize_with,
    round_fp16_stochastic,
    rounding_noise,
    rounding_noise_starts,
    unpack_codes,
)

CHUNK_ROWS = 1 << 16  # rows converted at a time when groups change


class IdError(ValueError):
    """An id outside its table."""


@dataclass(frozen=True)
class LocalTable:
    """What this store holds of one table."""

    name: str
    rows: int
    dim: int
    row_offset: int = 0  # first global row held here
    col_offset: int = 0  # first global column held here
    global_rows: int = -1
    table_id: int = 0  # stable id for the rounding noise (crc32 of the name)
    counts_once: bool = True  # False for copies of rows counted elsewhere (replicas, column slices)

    @property
    def total_rows(self) -> int:
        """The table's global rows (`rows` when `global_rows` is not given)."""
        return self.rows if self.global_rows < 0 else self.global_rows


# Counters whose step ended in the backward pass now running, and what numbers them: their
# `on_step_end` runs once that pass has finished, in the order the counters were made.
_ended_counters: List["StepCounter"] = []
_counters_made = itertools.count()


def _run_step_ends() -> None:
    ended = sorted(_ended_counters, key=lambda c: c.order)
    _ended_counters.clear()
    for counter in ended:
        if counter.on_step_end is not None:
            counter.on_step_end(counter.value)


class StepCounter:
    """The training step shared by the stores of one module (rounding noise, score decay).

    A step ends when a backward pass through the module has updated its rows, as FBGEMM's fused
    tables update in backward. The module calls `begin()` in a training forward and makes its
    output depend on `anchor` (every store's lookup takes it as an input too); once the
    gradients of all of them have reached it, the counter advances, and when that backward pass
    has finished, `on_step_end(new_step)` runs (the module's reassignment when it is due). No
    optimizer call is needed, and a rank that holds no rows of the module still advances with
    the others.

    Why at the end of the pass: the reassignment is collective, and the anchor's gradient is
    complete at different points of the pass on different ranks. A rank with none of a
    collection's rows has it right after the collection's output, before its exchange of
    gradients (an all-to-all) that the ranks holding the rows still wait in: the ranks then met
    in different collectives and hung (a model of two collections placed table-wise, one on
    each rank). Run after the pass, in the order the counters were made (the same on every
    rank), every rank's collectives come in one order.
    """

    def __init__(self) -> None:
        self.value = 0
        self.order = next(_counters_made)
        self.on_step_end: Optional[Callable[[int], None]] = None
        self.warned_no_labels = False
        self._pending = False
        self.anchor = torch.zeros(0, requires_grad=True)
        self.anchor.register_post_accumulate_grad_hook(self._end_of_step)

    def begin(self, training: bool) -> None:
        """A forward with autograd on ran: after a training one, the next backward pass through
        `anchor` ends a step; after an eval one it does not (its backward updates nothing).

        Args:
            training: whether the forward was a training one.
        """
        self._pending = training

    def _end_of_step(self, anchor: torch.Tensor) -> None:
        anchor.grad = None
        if not self._pending:
            return
        self._pending = False
        self.value += 1
        if self.on_step_end is None:
            return
        if not _ended_counters:  # the pass's first: run them all once it has finished
            torch.autograd.Variable._execution_engine.queue_callback(_run_step_ends)
        _ended_counters.append(self)


class RowGroupStore(RowLookup, RowOptimizer, nn.Module):
    """What one rank holds of a set of tables, in fp32, fp16, int8, int4, int2 (and dropped)
    groups. The tier layout and the moves are here; the lookup and its autograd come from
    `RowLookup` (row_lookup.py), the optimizer with Eq. 7 from `RowOptimizer`
    (row_optimizer.py)."""

    # Which kernels run the lookup and the row update (`row_lookup.kernels_for`): None picks by
    # device (C++ on CPU, Triton on CUDA); "cpp", "triton" or "torch" forces one (tests).
    kernels: Optional[str] = None

    def __init__(
        self,
        tables: Sequence[LocalTable],
        feature_names: Sequence[str],
        feature_tables: Sequence[int],
        policy: PrecisionPolicy,
        step: StepCounter,
        pooling: str = "sum",
        label_tagged: bool = True,
        weighted: bool = False,
        replicated_pg: Optional[dist.ProcessGroup] = None,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        dims = {t.dim for t in tables}
        if len(dims) > 1:
            raise NotImplementedError(f"one store holds tables of one dim, got {sorted(dims)}")
        self.tables = list(tables)
        self.dim = dims.pop() if dims else 4
        if self.dim % 4:
            raise ValueError(f"embedding dims must be multiples of 4 (FBGEMM), got {self.dim}")
        self.feature_names = list(feature_names)
        if not policy.is_resolved:
            raise ValueError("RowGroupStore needs a resolved policy: PrecisionPolicy.resolved(dims, fused_params)")
        self.policy = policy
        self.step = step
        self.pooling = pooling
        self.label_tagged = label_tagged
        self.weighted = weighted
        self.replicated_pg = replicated_pg
        self.device = device or torch.device("cpu")
        self.row_alignment = 1 if self.device.type == "cpu" else 16
        self.training_enabled = True
        self.nonfinite_rows = 0
        self.priority_seconds = 0.0  # time spent on Eq. 7 updates (for the overhead report)

        base = [0]
        for t in self.tables:
            base.append(base[-1] + t.rows)
        self.num_rows = base[-1]
        self.table_base = torch.tensor(base, dtype=torch.int64)
        ft = torch.tensor(list(feature_tables), dtype=torch.int64)
        self.feature_base = self.table_base[ft] if len(ft) else ft  # first key of each feature's table
        self.feature_rows = self.table_base[ft + 1] - self.feature_base if len(ft) else ft  # its table's rows here
        self._row_offset = torch.tensor([t.row_offset for t in self.tables], dtype=torch.int64)
        self._col_offset = torch.tensor([t.col_offset for t in self.tables], dtype=torch.int64)
        self._table_ids = torch.tensor([t.table_id for t in self.tables], dtype=torch.int64)

        n = self.num_rows
        # The row map, 4 bytes a row: one int32 slot numbered across the group tables, group by
        # group (fp32 rows, fp16, int8, int4, int2, then the fallback rows that dropped rows
        # point at), so a row's group follows from its slot's range (`_decode`). A one-tier
        # policy (`int4`, ...) keeps every row in its one group in key order: its map is the
        # identity and is not stored (`identity_map`: an empty `row_map`, which the ops read
        # as slot = key), so such a store costs its rows' bytes and nothing a row besides.
        self.identity_map = False
        self.row_map = torch.zeros(n, dtype=torch.int32)
        self._range_ends = torch.zeros(GROUPS, dtype=torch.int32)  # end of each stored group's range
        self._range_shift = torch.zeros(GROUPS + 1, dtype=torch.int32)  # map value - lookup slot, per group
        # Row-wise Adagrad's sum a row: fp32, or bf16 rounded stochastically (policy.momentum_dtype).
        self.momentum = torch.zeros(
            n if policy.optimizer == "rowwise_adagrad" else 0, dtype=policy.momentum_torch_dtype
        )
        scored = policy.scored
        self.row_priority = torch.zeros(n if scored else 0)
        self.row_seen_step = torch.zeros(n if scored else 0, dtype=torch.int32)
        # The dropped tier: a dropped row has no bytes of its own; its lookups read its table's
        # fallback row, one fp32 row per local table kept after the fp32 rows (its slot
        # points there), trained with the summed gradients of the table's dropped ids.
        self.has_dropped = DROPPED in policy.groups
        T = len(self.tables) if self.has_dropped else 0
        self.fallback_grad = torch.zeros(T, self.dim)
        self.fallback_momentum = torch.zeros(T if policy.optimizer == "rowwise_adagrad" else 0)
        self.capacity = [0] * GROUPS
        self.weights = torch.zeros(0, dtype=torch.uint8)
        self._offsets = [0] * GROUPS
        self._build_op_buffers()

    # ------------------------------------------------------------------ layout
    def _row_bytes(self, g: int) -> int:
        return row_bytes(self.dim, g, self.row_alignment)

    def _build_op_buffers(self) -> None:
        D = self.dim
        # One sequence feature for the TBE per group table (fp32, fp16, int8, int4, int2).
        self._op_D_offsets = torch.arange(0, GROUPS * D + 1, D, dtype=torch.int32)
        self._op_tys = torch.tensor([t.as_int() for t in _TYPES], dtype=torch.uint8)
        self._op_placements = torch.full((GROUPS,), EmbeddingLocation.HOST.value, dtype=torch.int32)
        self._op_offsets = torch.tensor(list(self._offsets), dtype=torch.int64)

    @property
    def op_layout(self) -> Tuple[torch.Tensor, ...]:
        """What every fused op (lookup and update, C++ and Triton) reads of the layout, in their
        argument order: the buffer, the group tables' byte offsets, the row map, and where each
        group's numbers end and what to subtract from them."""
        return self.weights, self._op_offsets, self.row_map, self._range_ends, self._range_shift

    def group_view(self, g: int, weights: Optional[torch.Tensor] = None, offsets=None, capacity=None):
        """Views into a group's table: fp32 [cap, D]; fp16 [cap, D]; int8 / int4 / int2
        (packed codes uint8 [cap, D * bits / 8], scale_bias fp16 [cap, 2]).

        Args:
            g: the group (FP32 .. INT2).
            weights, offsets, capacity: the buffer, its group tables' byte offsets and their rows
                (default: the store's own; another layout's, to read rows from it).

        Returns:
            The fp32 or fp16 view, or (codes, scale_bias) for an integer group; views, not copies.
        """
        w = self.weights if weights is None else weights
        off = (self._offsets if offsets is None else offsets)[g]
        cap = (self.capacity if capacity is None else capacity)[g]
        rb = self._row_bytes(g)
        raw = w[off : off + cap * rb].view(cap, rb)
        D = self.dim
        if g == FP32:
            return raw[:, : 4 * D].view(torch.float32)
        if g == FP16:
            return raw[:, : 2 * D].view(torch.float16)
        return raw[:, 4 : 4 + D * INT_BITS[g] // 8], raw[:, :4].view(torch.float16)

    def _raw_view(self, g, weights, offsets, capacity) -> torch.Tensor:
        """A group's rows as int32 words (int16 where a row is not a multiple of 4 bytes, as
        int4 rows at dims that are not multiples of 8): copying rows word by word is several
        times faster than byte by byte. Group tables start at multiples of 4 bytes."""
        rb = self._row_bytes(g)
        word = torch.int32 if rb % 4 == 0 else torch.int16
        size = 4 if word == torch.int32 else 2
        return weights[offsets[g] : offsets[g] + capacity[g] * rb].view(word).view(capacity[g], rb // size)

    # ------------------------------------------------------------------ row addressing
    def table_of_rows(self, keys: torch.Tensor) -> torch.Tensor:
        """The local table of each row key.

        Args:
            keys: row keys in the store's row space.

        Returns:
            int64 indices into `tables`.
        """
        return torch.searchsorted(self.table_base, keys, right=True) - 1

    @property
    def fallback_slot0(self) -> int:
        """The fp32 slot of the first local table's fallback row (they follow the fp32 rows)."""
        return self.capacity[FP32] - (len(self.tables) if self.has_dropped else 0)

    def _decode_map(self, m: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Row map values -> (group int64, slot in the group's table as the lookup reads it:
        a dropped row's is its table's fallback row in the fp32 table)."""
        g = torch.bucketize(m, self._range_ends, right=True)
        return g, (m - self._range_shift[g]).long()

    def map_values(self, keys: torch.Tensor) -> torch.Tensor:
        """The row map's int32 value of each row key (the key itself under an identity map).

        Args:
            keys: [n] row keys in the store's row space.

        Returns:
            int32 [n].
        """
        return keys.to(torch.int32) if self.identity_map else self.row_map[keys]

    def groups_of(self, keys: torch.Tensor) -> torch.Tensor:
        """int8 group of each row key.

        Args:
            keys: [n] row keys in the store's row space.

        Returns:
            int8 [n] group ids (DROPPED for a dropped row).
        """
        return self._decode_map(self.map_values(keys))[0].to(torch.int8)

    def slots_of(self, keys: torch.Tensor) -> torch.Tensor:
        """int64 lookup slot of each row key.

        Args:
            keys: [n] row keys in the store's row space.

        Returns:
            int64 [n] slots in their group's table (a dropped row's: its table's fallback row in
            the fp32 table).
        """
        return self._decode_map(self.map_values(keys))[1]

    def decoded_map(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(int8 group, int32 lookup slot) of every row, decoded from the row map in one pass
        (a chunk of rows at a time).

        Returns:
            (groups int8 [rows], slots int32 [rows]).
        """
        groups = torch.empty(self.num_rows, dtype=torch.int8)
        slots = torch.empty(self.num_rows, dtype=torch.int32)
        for a in range(0, self.num_rows, CHUNK_ROWS):
            b = min(a + CHUNK_ROWS, self.num_rows)
            g, s = self._decode_map(torch.arange(a, b, dtype=torch.int32) if self.identity_map else self.row_map[a:b])
            groups[a : a + CHUNK_ROWS] = g
            slots[a : a + CHUNK_ROWS] = s
        return groups, slots

    @property
    def row_group(self) -> torch.Tensor:
        """int8 [rows]: every row's group (decoded from the row map)."""
        return self.decoded_map()[0]

    @property
    def row_slot(self) -> torch.Tensor:
        """int32 [rows]: every row's slot in its group's table (decoded from the row map)."""
        return self.decoded_map()[1]

    def _set_map(self, groups: torch.Tensor, slots: torch.Tensor, counts: List[int]) -> None:
        """Encode (group, lookup slot) per row into the row map, for group tables of `counts` rows."""
        T = len(self.tables) if self.has_dropped else 0
        own = list(counts)
        own[FP32] -= T  # the fp32 table's last T rows are the fallback rows, numbered after int2
        ends = torch.tensor(own, dtype=torch.int64).cumsum(0)
        shift = torch.zeros(GROUPS + 1, dtype=torch.int64)
        shift[1:GROUPS] = ends[: GROUPS - 1]
        shift[DROPPED] = int(ends[-1]) - own[FP32]  # map = ends[-1] + t, lookup slot = own fp32 + t
        self._range_ends = ends.to(torch.int32)
        self._range_shift = shift.to(torch.int32)
        # Every row in a one-tier policy's group, laid out in key order (as `_rebuild` lays
        # them): the map would be the identity, so none is kept. Anything else (a
        # checkpoint's mixed groups loaded into a one-tier store) keeps a map.
        only = self.policy.groups[0]
        self.identity_map = not self.policy.scored and own[only] == self.num_rows and bool((groups == only).all())
        if self.identity_map:
            self.row_map = torch.zeros(0, dtype=torch.int32)
            return
        if self.row_map.numel() != self.num_rows:
            self.row_map = torch.zeros(self.num_rows, dtype=torch.int32)
        for a in range(0, self.num_rows, CHUNK_ROWS):
            g = groups[a : a + CHUNK_ROWS].long()
            self.row_map[a : a + CHUNK_ROWS] = (slots[a : a + CHUNK_ROWS].long() + shift[g]).to(torch.int32)

    def _lookup_groups(self, g: torch.Tensor) -> torch.Tensor:
        """Group tags as the TBE reads them: a dropped row is read from the fp32 table (its
        slot is its table's fallback row)."""
        return torch.where(g == DROPPED, torch.zeros_like(g), g) if self.has_dropped else g

    def _noise_rows(self, keys: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(local table, global row) of each row key: what its rounding noise hashes."""
        t = self.table_of_rows(keys)
        return t, keys - self.table_base[t] + self._row_offset[t]

    def noise_starts(self, keys: torch.Tensor, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(where each row's noise window starts in the noise table, the table): the noise
        `_noise` gives, as the fused update reads it.

        Args:
            keys: [n] row keys in the store's row space.
            step: the training step whose noise it is.

        Returns:
            (start int64 [n], the noise table), as `rounding_noise_starts` returns them.
        """
        t, rows = self._noise_rows(keys)
        return rounding_noise_starts(self.policy.seed, step, self._table_ids[t], rows, self._col_offset[t])

    def _noise(self, keys: torch.Tensor, step: int) -> torch.Tensor:
        t, rows = self._noise_rows(keys)
        cols = self._col_offset[t][:, None] + torch.arange(self.dim)[None, :]
        return rounding_noise(self.policy.seed, step, self._table_ids[t], rows, cols)

    # ------------------------------------------------------------------ values
    def grouping(self, keys: torch.Tensor, reads: bool = False) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """[(positions in `keys`, their slots)] per stored group: one sort instead of a boolean
        mask per group and per pass. Dropped rows: with `reads`, in the fp32 group at their
        fallback slot (what a lookup returns); otherwise left out (nothing to write).

        Args:
            keys: [n] row keys in the store's row space.
            reads: place dropped rows at their fallback slot (else leave them out).

        Returns:
            One (int64 positions, int64 slots) pair per stored group, FP32 first.
        """
        g, s = self._decode_map(self.map_values(keys))
        if reads:
            g = self._lookup_groups(g)
        order = torch.argsort(g, stable=True)
        out, a = [], 0
        for n in torch.bincount(g.long(), minlength=GROUPS).tolist()[:GROUPS]:  # dropped rows sort last
            pos = order[a : a + n]
            out.append((pos, s[pos]))
            a += n
        return out

    @staticmethod
    def _dequantize(grp: int, view, slots: torch.Tensor) -> torch.Tensor:
        """fp32 values of the given slots of a group view."""
        if grp in INT_BITS:
            codes, sb = view
            return dequantize_rows(unpack_codes(codes[slots], INT_BITS[grp]), sb[slots])
        return view[slots].float()

    def _round_into(
        self, grp: int, view, slots: torch.Tensor, values: torch.Tensor, keys: torch.Tensor, step: Optional[int]
    ) -> None:
        """Store fp32 values into slots of a group: exact for fp32; for fp16 and integer rows
        rounded stochastically with `step`'s noise (rows `keys`), or to nearest without a step."""
        if grp == FP32:
            view[slots] = values
        elif grp == FP16:
            if step is None:
                view[slots] = values.clamp(-65504.0, 65504.0).half()
            else:
                view[slots] = round_fp16_stochastic(values, self._noise(keys, step))
        else:
            bits = INT_BITS[grp]
            codes, sb = quantize_rows(values, bits, None if step is None else self._noise(keys, step))
            cview, sview = view
            cview[slots] = pack_codes(codes, bits)
            sview[slots] = sb

    def read_rows(self, keys: torch.Tensor) -> torch.Tensor:
        """Dequantized fp32 values of rows (by key in the store's row space).

        Args:
            keys: [n] row keys.

        Returns:
            fp32 [n, dim]; a dropped row's is its table's fallback row.
        """
        out = torch.empty(len(keys), self.dim)
        for grp, (pos, slots) in enumerate(self.grouping(keys, reads=True)):
            if len(pos):
                out[pos] = self._dequantize(grp, self.group_view(grp), slots)
        return out

    def write_rows(self, keys: torch.Tensor, values: torch.Tensor, step: Optional[int] = None) -> None:
        """Store fp32 values into rows in their current groups; with `step`, fp16 and int8
        rows are rounded stochastically with that step's noise, else to nearest. Dropped rows
        keep nothing (their values are gone: they read the fallback row).

        Args:
            keys: [n] row keys in the store's row space.
            values: fp32 [n, dim] the rows' new values.
            step: the training step whose noise rounds them (None: to nearest).
        """
        for grp, (pos, slots) in enumerate(self.grouping(keys)):
            if len(pos):
                self._round_into(grp, self.group_view(grp), slots, values[pos], keys[pos], step)

    def int_scale_bias(self, keys: torch.Tensor) -> torch.Tensor:
        """fp16 [n, 2] scale/bias of rows (zeros for rows not in an integer group).

        Args:
            keys: [n] row keys in the store's row space.

        Returns:
            fp16 [n, 2].
        """
        out = torch.zeros(len(keys), 2, dtype=torch.float16)
        groups, slots = self._decode_map(self.map_values(keys))
        for g in INT_BITS:
            m = groups == g
            if bool(m.any()):
                _, sb = self.group_view(g)
                out[m] = sb[slots[m]]
        return out

    def write_int_exact(self, g: int, keys: torch.Tensor, values: torch.Tensor, scale_bias: torch.Tensor) -> None:
        """Restore rows of integer group `g` whose values are code * scale + bias under the
        given scale/bias (from a checkpoint): their codes come back exactly.

        Args:
            g: the integer group (INT8, INT4 or INT2) the rows are in.
            keys: [n] row keys in the store's row space.
            values: fp32 [n, dim] the rows' values.
            scale_bias: fp16 [n, 2] each row's scale and bias.
        """
        s = self.slots_of(keys)
        codes, sb = self.group_view(g)
        codes[s] = pack_codes(requantize_with(values, scale_bias, INT_BITS[g]), INT_BITS[g])
        sb[s] = scale_bias

    # ------------------------------------------------------------------ groups
    def set_groups(self, groups: torch.Tensor) -> Dict[str, int]:
        """Move rows to the given groups (int8 tensor over the row space). Rows that stay keep
        their bytes; rows that move are converted (rounded to nearest). When every group keeps
        its size (budget mode on whole tables) rows move in place: a row entering a group
        takes a slot freed by a row leaving it, and only the moving rows are copied (in their
        old precision). Otherwise the buffer is rebuilt with exactly the rows each group
        needs.

        Args:
            groups: [rows] the group id of every row (converted to int8).

        Returns:
            Group name -> how many rows moved into it (every name of GROUP_NAMES).
        """
        groups = groups.to(torch.int8)
        fresh = self.capacity == [0] * GROUPS and self.weights.numel() == 0
        if len(groups) != self.num_rows:
            raise ValueError(f"set_groups: expected a group for each of {self.num_rows} rows, got {len(groups)}")
        if len(groups):
            lo, hi = torch.aminmax(groups)
            if int(lo) < 0 or int(hi) >= len(GROUP_NAMES):
                raise ValueError(
                    f"set_groups: group tags must be in [0, {len(GROUP_NAMES)}), got tags from {int(lo)} to {int(hi)}"
                )
        if self.identity_map and not fresh:
            if bool((groups == self.policy.groups[0]).all()):  # nothing moves (a checkpoint of this tier)
                return {name: 0 for name in GROUP_NAMES}
            if bool((groups == DROPPED).any()):  # refused below too; refused here before a map is made
                raise ValueError("rows can be dropped only under a policy whose tiers include 'dropped'")
            # A checkpoint's mixed groups: moves write map entries, so keep a map from here.
            self.row_map = torch.arange(self.num_rows, dtype=torch.int32)
            self.identity_map = False
        if not fresh and kernels_for(self) == "cpp":  # one pass of our C++ op over the row map
            move, sizes = changed_rows(self.row_map, self._range_ends, groups, len(GROUP_NAMES))
        else:  # its reference: every row's group decoded (no rows to move in a fresh store)
            move = None if fresh else (groups != self.decoded_map()[0]).nonzero().flatten()
            sizes = torch.bincount(groups.long(), minlength=len(GROUP_NAMES))
        counts = sizes.tolist()[:GROUPS]
        if self.has_dropped:
            counts[FP32] += len(self.tables)  # the fallback rows
        elif int(sizes[DROPPED]):
            raise ValueError("rows can be dropped only under a policy whose tiers include 'dropped'")
        # Rows moved into each group: one count of the rows whose group changed.
        into = (
            [0] * len(GROUP_NAMES)
            if move is None
            else torch.bincount(groups[move].long(), minlength=len(GROUP_NAMES)).tolist()
        )
        moved = {GROUP_NAMES[g]: into[g] for g in range(len(GROUP_NAMES))}
        if move is None:
            self._rebuild(groups, counts, None)
        elif counts == self.capacity and not self.has_dropped:
            self._move_in_place(groups, move)
        else:
            self._rebuild(groups, counts, self.decoded_map())
        self._build_op_buffers()
        return moved

    def _byte_offsets(self, groups: torch.Tensor, slots: torch.Tensor, offsets: Sequence[int]) -> torch.Tensor:
        """int64 byte offset of each (group, slot) in a buffer whose group tables start at `offsets`."""
        rb = torch.tensor([self._row_bytes(g) for g in range(GROUPS)], dtype=torch.int64)
        g = groups.long()
        return torch.tensor(list(offsets), dtype=torch.int64)[g] + slots.long() * rb[g]

    def _move_in_place(self, groups: torch.Tensor, move: torch.Tensor) -> None:
        """Rows `move` (ascending) change group, every group keeping its size: a row entering
        group g takes a slot a row leaving g freed (as many leave as enter). Only their map
        entries and bytes are touched."""
        if not len(move):
            return
        src_group, old_slots = self._decode_map(self.row_map[move])
        dst_group = groups[move].long()
        new_slots = torch.empty_like(old_slots)
        for g in range(GROUPS):
            new_slots[dst_group == g] = old_slots[src_group == g]
        # The rows' bytes are read by their old slots below, not through the map.
        self.row_map[move] = (new_slots + self._range_shift[dst_group]).to(torch.int32)
        if kernels_for(self) == "cpp":
            # One pass of our C++ op; it reads every moving row before writing any.
            src_at = self._byte_offsets(src_group, old_slots, self._offsets)
            dst_at = self._byte_offsets(dst_group, new_slots, self._offsets)
            convert_rows_(
                self.weights,
                dst_at,
                dst_group.to(torch.int8),
                self.weights,
                src_at,
                src_group.to(torch.int8),
                self.dim,
                self.row_alignment,
            )
            return
        # Raw bytes of the moving rows, per old group, before any slot is reused.
        saved = []
        for g in range(GROUPS):
            m = src_group == g
            saved.append((move[m], self._raw_view(g, self.weights, self._offsets, self.capacity)[old_slots[m]].clone()))
        for g, (rows, raw) in enumerate(saved):
            for start in range(0, len(rows), CHUNK_ROWS):
                chunk = raw[start : start + CHUNK_ROWS]
                self.write_rows(rows[start : start + CHUNK_ROWS], self._decode(g, chunk))

    def _decode(self, g: int, raw: torch.Tensor) -> torch.Tensor:
        D = self.dim
        raw = raw.contiguous().view(torch.uint8)
        if g == FP32:
            return raw[:, : 4 * D].contiguous().view(torch.float32)
        if g == FP16:
            return raw[:, : 2 * D].contiguous().view(torch.float16).float()
        bits = INT_BITS[g]
        codes = unpack_codes(raw[:, 4 : 4 + D * bits // 8], bits)
        return dequantize_rows(codes, raw[:, :4].contiguous().view(torch.float16))

    def _rebuild(
        self, groups: torch.Tensor, counts: List[int], old: Optional[Tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        """Lay the group tables out anew for `counts`; with `old` (the row map decoded before
        the change), carry every row over from the old buffer."""
        if sum(counts) >= 1 << 31:  # the row map's int32 (checked before anything changes)
            raise ValueError(f"a store holds at most 2^31 rows, got {sum(counts)}")
        copy = old is not None
        old_groups, old_slots = old if copy else (None, None)
        old_w, old_off, old_cap = self.weights, list(self._offsets), list(self.capacity)
        # Group tables back to back, each starting at a multiple of 4 bytes (for its dtype
        # views). Rows of fp32, fp16 and int8 are multiples of 4 bytes (dims are), and int4
        # rows are unless the dim is 4 mod 8, which int2 (then the only table after int4)
        # does not allow: no padding ever lands between tables in use.
        offsets, total = [], 0
        for g in range(GROUPS):
            if counts[g]:
                total = (total + 3) // 4 * 4
            offsets.append(total)
            total += counts[g] * self._row_bytes(g)
        new_w = torch.zeros(total, dtype=torch.uint8)
        new_slots = torch.zeros(self.num_rows, dtype=torch.int32)
        filled = [0] * GROUPS
        T = len(self.tables) if self.has_dropped else 0
        fallback0 = counts[FP32] - T
        for a in range(0, self.num_rows, CHUNK_ROWS):  # slots in row order, a chunk at a time
            chunk = groups[a : a + CHUNK_ROWS]
            out = new_slots[a : a + CHUNK_ROWS]
            for g in range(GROUPS):
                m = chunk == g
                n = int(m.sum())
                if n:
                    out[m] = torch.arange(filled[g], filled[g] + n, dtype=torch.int32)
                    filled[g] += n
            if T:
                m = chunk == DROPPED
                if bool(m.any()):  # a dropped row's slot is its table's fallback row
                    out[m] = (fallback0 + self.table_of_rows(torch.arange(a, a + len(chunk))[m])).to(torch.int32)
        old_fallback0 = self.fallback_slot0
        self.weights, self._offsets, self.capacity = new_w, offsets, counts
        self._set_map(groups, new_slots, counts)
        if T and copy and old_cap[FP32] >= T:  # the fallback rows, bytes as they were
            fp32_new = self._raw_view(FP32, new_w, offsets, counts)
            fp32_new[fallback0 : fallback0 + T] = self._raw_view(FP32, old_w, old_off, old_cap)[
                old_fallback0 : old_fallback0 + T
            ]
        if not copy:
            return
        for g in range(GROUPS):
            stay = ((groups == g) & (old_groups == g)).nonzero().flatten()
            if len(stay):
                self._raw_view(g, new_w, offsets, counts)[new_slots[stay].long()] = self._raw_view(
                    g, old_w, old_off, old_cap
                )[old_slots[stay].long()]
        move = (groups != old_groups).nonzero().flatten()
        if kernels_for(self) == "cpp":
            # One pass of our C++ op: a dropped row keeps nothing, and one revived reads its
            # table's fallback row (its lookup slot in the fp32 table).
            move = move[groups[move] != DROPPED]
            src_group = self._lookup_groups(old_groups[move])
            dst_group = groups[move]
            convert_rows_(
                new_w,
                self._byte_offsets(dst_group, new_slots[move], offsets),
                dst_group,
                old_w,
                self._byte_offsets(src_group, old_slots[move], old_off),
                src_group,
                self.dim,
                self.row_alignment,
            )
            return
        for start in range(0, len(move), CHUNK_ROWS):
            keys = move[start : start + CHUNK_ROWS]
            values = self._read_from(keys, old_groups, old_slots, old_w, old_off, old_cap)
            self.write_rows(keys, values)

    def _read_from(self, keys, groups, slots, weights, offsets, capacity) -> torch.Tensor:
        """Like `read_rows`, from an earlier layout (groups, slots and buffer)."""
        out = torch.empty(len(keys), self.dim)
        g = self._lookup_groups(groups[keys])
        s = slots[keys].long()
        for grp in range(GROUPS):
            m = g == grp
            if bool(m.any()):
                out[m] = self._dequantize(grp, self.group_view(grp, weights, offsets, capacity), s[m])
        return out

    def group_counts(self) -> List[int]:
        """Rows in each of the policy's groups, most precise first (fp32, fp16, int8 for the
        paper's tiers).

        Returns:
            One count per group of the policy, in its order.
        """
        counts = torch.bincount(self.row_group.long(), minlength=len(GROUP_NAMES)).tolist()
        return [counts[g] for g in self.policy.groups]

    def scores_now(self, lo: int = 0, hi: Optional[int] = None) -> torch.Tensor:
        """Priorities of rows [lo, hi) as of the last completed step (the counter has already
        moved past it); zeros when the policy keeps no scores.

        Args:
            lo: the first row key.
            hi: the row key after the last (None: the store's rows up to the end).

        Returns:
            float32 [hi - lo].
        """
        hi = self.num_rows if hi is None else hi
        if not self.row_priority.numel():
            return torch.zeros(hi - lo)
        return decayed(self.row_priority[lo:hi], self.row_seen_step[lo:hi], self.step.value - 1, self.policy.beta)

    # ------------------------------------------------------------------ memory
    def table_bytes(self) -> List[Dict[str, int]]:
        """Per local table: embedding bytes (weights + row map), optimizer and priority bytes.
        Group tables are shared by the store's tables: each table is charged for its rows.

        Returns:
            One dict per local table, in `tables`' order: {"embedding_bytes", "optimizer_bytes",
            "priority_bytes", "rows_<group>" for every group of GROUP_NAMES}.
        """
        out = []
        for i, t in enumerate(self.tables):
            lo, hi = int(self.table_base[i]), int(self.table_base[i + 1])
            counts = torch.bincount(self.groups_of(torch.arange(lo, hi)).long(), minlength=len(GROUP_NAMES)).tolist()
            weights = sum(c * self._row_bytes(g) for g, c in enumerate(counts))
            if self.has_dropped:
                weights += self._row_bytes(FP32)  # the table's fallback row
            out.append(
                {
                    "embedding_bytes": weights + (0 if self.identity_map else t.rows * ROW_MAP_BYTES),
                    "optimizer_bytes": (hi - lo) * self.momentum.element_size() if self.momentum.numel() else 0,
                    "priority_bytes": (hi - lo) * 8 if self.row_priority.numel() else 0,
                    **{f"rows_{name}": counts[g] for g, name in enumerate(GROUP_NAMES)},
                }
            )
        return out

    # ------------------------------------------------------------------ fallback rows
    def fallback_rows(self) -> torch.Tensor:
        """fp32 [local tables, dim]: every local table's fallback row (empty without the tier).

        Returns:
            A copy of the rows, [0, dim] without the tier.
        """
        if not self.has_dropped:
            return torch.zeros(0, self.dim)
        return self.group_view(FP32)[self.fallback_slot0 : self.fallback_slot0 + len(self.tables)].clone()

    @torch.no_grad()
    def set_fallback_rows(self, index: int, value: torch.Tensor, momentum: Optional[torch.Tensor] = None) -> None:
        """Set local table `index`'s fallback row (and its optimizer state).

        Args:
            index: the local table (an index into `tables`).
            value: [dim] the row.
            momentum: its row-wise Adagrad state, a one-element tensor (None, or an optimizer
                without it: left as it is).
        """
        self.group_view(FP32)[self.fallback_slot0 + index] = value.float().reshape(self.dim)
        if momentum is not None and self.fallback_momentum.numel():
            self.fallback_momentum[index] = float(momentum)

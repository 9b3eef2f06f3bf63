"""Checkpoint tensors that are decoded when they are written, not when the state dict is taken.

A state dict of mixed-precision tables holds every row as fp32 (`weight`) beside per-row state
repeated over the row's columns (`qparams`, `momentum`, ...): about twice the fp32 table, made
at once by `state_dict()`. For saving, `LazyRows` stands in for one block of rows of one such
tensor: a tensor with a shape and a dtype but no storage, whose values are produced (decoded from
the store) by the first operation that reads them, and dropped with the result. DCP's writer
reads each shard with `detach()` when it writes it, so a checkpoint written through lazy blocks
holds only the blocks in flight beside the store.

A `LazyRows` is read-only: an operation that writes into it (as `dcp.load` would) is refused,
and the modules' load hooks refuse it by name.
"""

from __future__ import annotations

from typing import Callable, Iterator, Tuple

import torch
from torch.utils._pytree import tree_map

# Rows per written block: about this many bytes of fp32 weight each (16 MB: a save of a 1 GB
# table then held 0.08 GB beside the store, 32 MB 0.30 GB; smaller blocks mean more DCP entries).
BLOCK_BYTES = 16 << 20


class LazyRows(torch.Tensor):
    """A [rows, columns] (or [rows]) CPU tensor whose values `produce()` computes when an
    operation reads them (each read computes them anew; nothing is cached)."""

    @staticmethod
    def __new__(cls, size: Tuple[int, ...], dtype: torch.dtype, produce: Callable[[], torch.Tensor]) -> "LazyRows":
        t = torch.Tensor._make_wrapper_subclass(cls, size, dtype=dtype, device="cpu")
        t._produce = produce
        return t

    def __repr__(self) -> str:  # the default repr would read the values
        return f"LazyRows(size={tuple(self.shape)}, dtype={self.dtype})"

    def materialize(self) -> torch.Tensor:
        """The values, as a plain tensor (checked against the declared shape and dtype).

        Returns:
            A new plain tensor.

        Raises:
            RuntimeError: the producer returned another shape or dtype (a bug).
        """
        out = self._produce()
        if tuple(out.shape) != tuple(self.shape) or out.dtype != self.dtype:
            raise RuntimeError(
                f"lazy checkpoint block produced {tuple(out.shape)} {out.dtype}, "
                f"declared {tuple(self.shape)} {self.dtype}"
            )
        return out

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.is_pinned.default:
            return False  # asked while a save is planned: answering must not decode the rows
        if func._schema.is_mutable:  # e.g. dcp.load's copy_: it would land in a temporary
            raise RuntimeError(
                f"{func} writes into a LazyRows: a state dict from lazy_state_dict is for saving; "
                "load into model.state_dict() or with load_state_in_place"
            )

        def plain(x):
            return x.materialize() if isinstance(x, LazyRows) else x

        return func(*tree_map(plain, args), **tree_map(plain, kwargs or {}))


def block_rows(dim: int) -> int:
    """Rows per lazy block of a table of width `dim` (the same on every rank).

    Args:
        dim: the table's full embedding dim.

    Returns:
        At least 1.
    """
    return max(1, BLOCK_BYTES // (4 * max(dim, 1)))


def row_blocks(start: int, rows: int, per_block: int) -> Iterator[Tuple[int, int]]:
    """Split rows `start` .. `start + rows` into blocks of at most `per_block` rows.

    Args:
        start: the first row.
        rows: how many rows (0 gives one empty block, so that an empty shard keeps its entry).
        per_block: rows per block.

    Yields:
        (first row, rows) of each block, in order.
    """
    if rows == 0:
        yield start, 0
        return
    for r0 in range(start, start + rows, per_block):
        yield r0, min(per_block, start + rows - r0)


class RowSink(torch.Tensor):
    """A write-only stand-in for one block of a state tensor, as a destination of `dcp.load`:
    a copy into it, or into a slice of it, hands the values and their place to `deliver(offsets,
    values)` (offsets: (row, column) within the block) instead of keeping them, so a load can put
    each piece straight into the store. Any other operation that would read it is refused."""

    @staticmethod
    def __new__(
        cls,
        size: Tuple[int, ...],
        dtype: torch.dtype,
        deliver: Callable[[Tuple[int, int], torch.Tensor], None],
        offsets: Tuple[int, int] = (0, 0),
    ) -> "RowSink":
        t = torch.Tensor._make_wrapper_subclass(cls, size, dtype=dtype, device="cpu")
        t._deliver = deliver
        t._offsets = offsets
        return t

    def __repr__(self) -> str:
        return f"RowSink(size={tuple(self.shape)}, dtype={self.dtype}, offsets={self._offsets})"

    def _like(self, size: Tuple[int, ...], offsets: Tuple[int, int]) -> "RowSink":
        return RowSink(size, self.dtype, self._deliver, offsets)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        aten = torch.ops.aten
        if func is aten.is_pinned.default:
            return False
        if func in (aten.detach.default, aten.alias.default):
            return args[0]._like(tuple(args[0].shape), args[0]._offsets)
        if func is aten.slice.Tensor:  # what DCP's narrow to a read item's place becomes
            sink, dim, start, end, step = list(args) + [0, None, None, 1][len(args) - 1 :]
            n = sink.shape[dim]
            start = 0 if start is None else min(max(start + n if start < 0 else start, 0), n)
            end = n if end is None else min(max(end + n if end < 0 else end, start), n)
            if step != 1:
                raise RuntimeError("RowSink: a strided slice is not a place rows can be loaded into")
            size = list(sink.shape)
            size[dim] = end - start
            offsets = list(sink._offsets)
            offsets[dim] += start
            return sink._like(tuple(size), (offsets[0], offsets[1]))
        if func is aten.copy_.default:
            sink, src = args[0], args[1]
            if tuple(src.shape) != tuple(sink.shape):
                raise RuntimeError(f"RowSink: {tuple(src.shape)} copied into a place of {tuple(sink.shape)}")
            sink._deliver(sink._offsets, src.to(sink.dtype))
            return sink
        raise RuntimeError(
            f"{func} on a RowSink: it is a load destination whose values go straight into the store "
            "(load_state_in_place), not a tensor to read"
        )

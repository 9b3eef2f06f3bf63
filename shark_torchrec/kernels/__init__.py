"""Our compiled ops, `torch.ops.shark.*`, and how they are built and loaded.

- `mixed_lookup` is the fused lookup of rows kept in precision groups (`lookup.cpp`): ids ->
  row map -> group and slot -> the row's bytes -> dequantized, weighted, pooled into the output
  layout, in one pass per bag, parallel over bags. Its reference is `mixed_lookup_reference`
  (`shark_torchrec.kernels.reference`: the torch code around FBGEMM's INT-N inference op that
  it replaces), and the two agree bit for bit.
- `mixed_lookup_ranked` is the same lookup for a served store (`lookup.cpp`): rows found by the
  ranked map, about half a byte a row in place of the row map's four (`ranked_map.py`). Its
  reference is `mixed_lookup_ranked_reference` (the map decoded in torch, the rows read by
  FBGEMM's INT-N op); bit for bit too.
- `update_rows_` is the fused row update (`update.cpp`): each touched row read from its group,
  stepped, and written back with stochastic rounding, in place. Its reference is the torch
  code of `RowOptimizer.step_rows(kernels="torch")` with `shark_torchrec.precision.quantize`; bit
  for bit too.
- `update_priorities_` is paper Eq. 7 for a step's touched rows (`update.cpp`), in place, in one
  op. Its reference is the torch code of `RowOptimizer.apply_update` with kernels "torch"
  (`shark_torchrec.precision.priority.updated`); bit for bit too.
- `rowwise_adagrad_scales_` is row-wise Adagrad's state update and step scale for a step's
  touched rows (`update.cpp`), in place. Its reference is the torch code of
  `RowOptimizer._step_scale`; bit for bit too.
- `update_rows_hashed_` is `update_rows_` hashing each row's rounding noise window in its
  pass, where `update_rows_` reads windows torch hashed before it.
- `row_grads_update_` is the whole backward of a store's rows after `ids_by_row`, in one
  pass over the distinct rows (`update.cpp`; the store's CPU path where no dropped,
  replicated or bf16-state rows need the steps apart): each row's gradient summed over its ids
  (`row_grads`), its mean square and finiteness check, its row-wise Adagrad state and scale,
  and its step (`update_rows_hashed_`). Its reference is the same ops' references run one
  after the other (`RowLookup._row_grads_torch`, then `RowOptimizer.apply_update` with
  kernels "torch"); bit for bit too. `row_mean_squares` is its mean square alone, equal to
  torch's `(g * g).mean(dim=1)` bit for bit (`fused_backward_agrees` checks it).
- `convert_rows_` converts the rows that change group at a reassignment (`update.cpp`): each
  decoded from its old group and rounded to nearest into its new one, in one parallel pass.
  Its reference is the torch code of `RowGroupStore` with kernels "torch"; bit for bit too.
- `ids_by_row` groups a batch's ids by the row they read (`grads.cpp`), the backward's first
  step: each id's bag, a stable sort of the ids by row key (one radix sort), the distinct rows
  and their ids' counts. Its reference is the torch code of `RowLookup._ids_by_row_torch`
  (a stable argsort and `unique_consecutive`); equal, tensor for tensor.
- `row_grads` is the backward's per-row gradient reduction (`grads.cpp`): each distinct row's
  gradient summed over its ids, read where they sit in the output gradient. Its reference is
  the torch code of `RowLookup._row_grads_torch`; bit for bit too.
- `split_ranking_keys` and `groups_by_ranking` make a reassignment's ranking keys from a block
  of scores (`ranking.cpp`): the keys split into the zero-score run and the others, and each
  row's group under the cuts. Their references are `split_ranking_keys_torch` and
  `groups_by_ranking_torch` (`shark_torchrec.precision.priority`); equal, key for key.
  `split_ranking_keys` can take the stored Eq. 7 scores and decay them itself (from
  `decay_table`, as `decayed` does), divided per byte for the model-wide budget.
- `changed_rows` finds the rows a reassignment moves (`ranking.cpp`): the rows whose group in
  the row map differs from the new one, and the new groups' sizes, in one pass over the map.
  Its reference is the torch code of `RowGroupStore.set_groups` with kernels "torch", which
  decodes the whole map.

The library is compiled once per source, torch version and flags with g++ against
`torch/library.h` (no pybind, no ninja) into `<venv>/shark_kernels/` (see `library_path`); `scripts/setup.sh`
builds it, and a missing one is built on first import (about 15 s, said on stderr). A failed
build raises `KernelBuildError` with the compiler's output: there is no silent slow path.
The serving export copies the library next to the scripted model, and `serve.py` loads it
with `torch.ops.load_library`.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, Optional, Tuple

import torch

SOURCES = [Path(__file__).with_name(n) for n in ("lookup.cpp", "update.cpp", "grads.cpp", "ranking.cpp")]
HEADERS = [Path(__file__).with_name(n) for n in ("layout.h", "grads.h", "decay.h")]
POOLING_CODES = {"sum": 0, "mean": 1, "none": 2}
OPS = (
    "one_bit_layout",
    "one_bit_magnitudes",
    "mixed_lookup",
    "mixed_lookup_ranked",
    "update_rows_",
    "row_grads",
    "ids_by_row",
    "convert_rows_",
    "update_rows_hashed_",
    "split_ranking_keys",
    "groups_by_ranking",
    "changed_rows",
    "update_priorities_",
    "rowwise_adagrad_scales_",
    "row_mean_squares",
    "row_grads_update_",
)  # what the library registers under torch.ops.shark
# The instruction sets the library is compiled for (FBGEMM's CPU build needs them anyway).
ISA = ["avx2", "fma", "f16c"] if platform.machine() in ("x86_64", "AMD64") else []


class KernelBuildError(RuntimeError):
    """The C++ ops did not compile or load."""


def built_for() -> dict:
    """What a compiled library needs of the machine that loads it (the serving export records it).

    Returns:
        {"torch": the torch version, "machine": the CPU architecture, "isa": the instruction
        sets it was compiled for}.
    """
    return {"torch": torch.__version__, "machine": platform.machine(), "isa": list(ISA)}


def _flags() -> List[str]:
    from torch.utils import cpp_extension

    flags = ["-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", "-ffp-contract=off"]
    flags += [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    flags += [f"-m{isa}" for isa in ISA]
    # Real paths: the same torch reached through a symlinked .venv (the docs test's scratch
    # folders link it) must give the same flags, hence the same cached library, not a build
    # per link (each of those compiled the library again, 15-45 s).
    flags += [f"-I{Path(p).resolve()}" for p in cpp_extension.include_paths()]
    lib = Path(torch.__file__).resolve().parent / "lib"
    # libgomp resolves to torch's own copy (same soname, already loaded): one OpenMP runtime.
    flags += [f"-L{lib}", f"-Wl,-rpath,{lib}", "-lc10", "-ltorch_cpu", "-ltorch"]
    return flags


def library_path() -> Path:
    """Where the library for these sources, this torch and these flags lives (or will).

    Returns:
        `<dir>/shark_kernels-<hash>.so`, dir being `$SHARK_KERNELS_DIR`, else
        `<sys.prefix>/shark_kernels` (inside `.venv` for the project's own environment) when
        writable, else `~/.cache/shark_torchrec/kernels`.
    """
    h = hashlib.sha256()
    for src in SOURCES + HEADERS:
        h.update(src.read_bytes())
    h.update(torch.__version__.encode())
    h.update(" ".join(_flags()).encode())
    return _library_dir() / f"shark_kernels-{h.hexdigest()[:16]}.so"


def _library_dir() -> Path:
    """`$SHARK_KERNELS_DIR`, else `<sys.prefix>/shark_kernels` (the project's .venv) when that
    is writable or already there, else `~/.cache/shark_torchrec/kernels` (a system Python)."""
    if os.environ.get("SHARK_KERNELS_DIR"):
        return Path(os.environ["SHARK_KERNELS_DIR"])
    in_prefix = Path(sys.prefix) / "shark_kernels"
    if in_prefix.is_dir() or os.access(sys.prefix, os.W_OK):
        return in_prefix
    return Path.home() / ".cache" / "shark_torchrec" / "kernels"


def build(quiet: bool = False) -> Path:
    """Compile the library unless it is already there for these sources.

    Args:
        quiet: say nothing on stderr.

    Returns:
        The library's path.

    Raises:
        KernelBuildError: g++ failed or is missing (its output is in the message).
    """
    out = library_path()
    if out.exists():
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KernelBuildError(
            f"cannot create {out.parent} for shark_torchrec's C++ kernels ({e}): "
            "set SHARK_KERNELS_DIR to a writable directory"
        ) from e
    if not quiet:
        print(f"shark_torchrec: compiling the C++ kernels into {out} (about 15 s, once)...", file=sys.stderr)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = ["g++", *[str(s) for s in SOURCES], "-o", tmp, *_flags()]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError as e:
        os.unlink(tmp)
        raise KernelBuildError(f"building shark_torchrec's C++ kernels needs g++ on PATH: {e}") from e
    if res.returncode != 0:
        os.unlink(tmp)
        raise KernelBuildError(
            f"building shark_torchrec's C++ kernels failed (exit {res.returncode}):\n  {' '.join(cmd)}\n"
            f"{res.stderr[-4000:]}"
        )
    os.replace(tmp, out)  # atomic: a concurrent process sees the whole library or none
    # Builds of other sources stay (about 200 KB each): another checkout sharing this
    # directory, or a running process, may still use them.
    return out


_loaded: Optional[Path] = None


def load() -> Path:
    """Build if needed, then load the library into this process (once).

    Returns:
        The loaded library's path (what the serving export ships).
    """
    global _loaded
    if _loaded is None:
        present = [op for op in OPS if hasattr(torch.ops.shark, op)]
        if present:
            # Registered already (an export's copy, loaded by its serve.py): loading a second
            # copy would abort the process (an operator registered twice).
            if len(present) != len(OPS):
                raise KernelBuildError(
                    f"another build of shark_torchrec's C++ kernels is loaded in this process (it has "
                    f"{', '.join(present)} but not {', '.join(op for op in OPS if op not in present)}): "
                    "import shark_torchrec before loading an export's shark_kernels.so"
                )
            _loaded = build(quiet=True)
            return _loaded
        path = build()
        try:
            torch.ops.load_library(str(path))
        except OSError as e:
            raise KernelBuildError(f"loading shark_torchrec's C++ kernels from {path} failed: {e}") from e
        _loaded = path
    return _loaded


load()


def _lookup_output_like(values, feature_base, dim: int, batch_size: int, pooling: int):
    """The output both lookups' fakes give: [nnz, dim] unpooled (pooling 2), else [B, F * dim]."""
    if pooling == 2:
        return values.new_empty((values.shape[0], dim), dtype=torch.float32)
    return values.new_empty((batch_size, feature_base.shape[0] * dim), dtype=torch.float32)


@torch.library.register_fake("shark::mixed_lookup")
def _mixed_lookup_fake(
    weights,
    group_offsets,
    row_map,
    range_ends,
    range_shift,
    feature_base,
    feature_rows,
    values,
    lengths,
    per_sample_weights,
    dim,
    batch_size,
    pooling,
    row_alignment,
    feature_names,
):
    return _lookup_output_like(values, feature_base, dim, batch_size, pooling)


def mixed_lookup(
    weights: torch.Tensor,
    group_offsets: torch.Tensor,
    row_map: torch.Tensor,
    range_ends: torch.Tensor,
    range_shift: torch.Tensor,
    feature_base: torch.Tensor,
    feature_rows: torch.Tensor,
    values: torch.Tensor,
    lengths: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    dim: int,
    batch_size: int,
    pooling: str,
    row_alignment: int,
    feature_names: List[str],
) -> torch.Tensor:
    """Rows of the ids, read from a mixed-precision buffer and pooled per bag, in one C++ pass.

    Args:
        weights: uint8 buffer of the group tables (fp32, fp16, int8, int4, int2 rows, FBGEMM's
            layout: an integer row is its fp16 scale and bias, then codes packed low bits first).
        group_offsets: int64, byte offset of each group table in `weights` (as many groups as
            the rows use; dropped rows read the fp32 table).
        row_map: int32 per row: its slot numbered across the group tables.
        range_ends: int32 [5], where each stored group's numbers end.
        range_shift: int32 [6], per group (dropped last), what to subtract from a row map value
            to get the slot in the table read.
        feature_base: int64 [F], each feature's first row in the row map.
        feature_rows: int64 [F], the rows of each feature's table (ids are checked against it).
        values: [nnz] ids, feature-major bags as a KJT lays them out.
        lengths: [F * B] ids per bag.
        per_sample_weights: [nnz] float weights of the ids, or None.
        dim: embedding dim.
        batch_size: B.
        pooling: "sum", "mean" or "none".
        row_alignment: FBGEMM's row alignment of the buffer.
        feature_names: names for the out-of-range error.

    Returns:
        [B, F * dim] float32 (sample b's pooled rows, feature by feature); with pooling
        "none", [nnz, dim], one row per id.

    Raises:
        ValueError: an id outside its feature's table (naming the feature and the id).
    """
    return torch.ops.shark.mixed_lookup(
        weights,
        group_offsets,
        row_map,
        range_ends,
        range_shift,
        feature_base,
        feature_rows,
        values,
        lengths,
        per_sample_weights,
        dim,
        batch_size,
        POOLING_CODES[pooling],
        row_alignment,
        "\n".join(feature_names),
    )


@torch.library.register_fake("shark::mixed_lookup_ranked")
def _mixed_lookup_ranked_fake(
    weights,
    group_offsets,
    blocks,
    code_groups,
    table_base,
    table_fallback,
    feature_base,
    feature_rows,
    values,
    lengths,
    per_sample_weights,
    dim,
    batch_size,
    pooling,
    row_alignment,
    feature_names,
):
    return _lookup_output_like(values, feature_base, dim, batch_size, pooling)


def mixed_lookup_ranked(
    weights: torch.Tensor,
    group_offsets: torch.Tensor,
    blocks: torch.Tensor,
    code_groups: torch.Tensor,
    table_base: torch.Tensor,
    table_fallback: torch.Tensor,
    feature_base: torch.Tensor,
    feature_rows: torch.Tensor,
    values: torch.Tensor,
    lengths: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    dim: int,
    batch_size: int,
    pooling: str,
    row_alignment: int,
    feature_names: List[str],
) -> torch.Tensor:
    """`mixed_lookup` of a served store whose rows are found by the ranked map (about half a
    byte a row in place of the int32 row map; `shark_torchrec.kernels.ranked_map`).

    Args:
        weights: uint8 buffer of the group tables, each holding its rows in key order
            (`RankedLayout.weights`).
        group_offsets: int64 [5 to 9], byte offset of each group table (by group id, up to the
            largest present: `RankedLayout.group_offsets`).
        blocks: int32 [ceil(rows / 64), words], the ranked map's block records.
        code_groups: int32, the group id of each code (dropped, 5, last).
        table_base: int64 [T + 1], each table's first row key, then the rows (keys past them
            are refused as a layout error).
        table_fallback: int64 [T], each table's fallback row in the fp32 table (-1: none).
        feature_base, feature_rows, values, lengths, per_sample_weights, dim, batch_size,
            pooling, row_alignment, feature_names: as for `mixed_lookup`.

    Returns:
        As `mixed_lookup`.

    Raises:
        ValueError: an id outside its feature's table (naming the feature and the id).
    """
    return torch.ops.shark.mixed_lookup_ranked(
        weights,
        group_offsets,
        blocks,
        code_groups,
        table_base,
        table_fallback,
        feature_base,
        feature_rows,
        values,
        lengths,
        per_sample_weights,
        dim,
        batch_size,
        POOLING_CODES[pooling],
        row_alignment,
        "\n".join(feature_names),
    )


@torch.library.register_fake("shark::update_rows_")
def _update_rows_fake(
    weights,
    group_offsets,
    row_map,
    range_ends,
    range_shift,
    keys,
    row_grad,
    step_scale,
    noise_table,
    noise_start,
    dim,
    row_alignment,
):
    return None


def update_rows_(
    weights: torch.Tensor,
    group_offsets: torch.Tensor,
    row_map: torch.Tensor,
    range_ends: torch.Tensor,
    range_shift: torch.Tensor,
    keys: torch.Tensor,
    row_grad: torch.Tensor,
    step_scale: torch.Tensor,
    noise_table: torch.Tensor,
    noise_start: torch.Tensor,
    dim: int,
    row_alignment: int,
) -> None:
    """Step rows in place in their groups: new = old - row_grad * step_scale, written back exact
    (fp32) or with stochastic rounding (fp16; integer rows requantized over the new range).

    Args:
        weights: the uint8 buffer of the group tables (as for `mixed_lookup`), updated in place.
        group_offsets, row_map, range_ends, range_shift: the layout (as for `mixed_lookup`).
        keys: [n] distinct row keys (row map indices); dropped rows among them are skipped
            (they have no bytes: their gradients go to the fallback row, by the caller).
        row_grad: [n, dim] float32 gradients.
        step_scale: [n] float32, what each row's gradient is multiplied by (the learning rate,
            divided by row-wise Adagrad's root for that optimizer).
        noise_table: float32 uniform [0, 1) noise (`shark_torchrec.precision.quantize`'s table).
        noise_start: [n] int64, where each row's `dim` noise values start in `noise_table`.
        dim: embedding dim.
        row_alignment: the buffer's row alignment.

    Raises:
        RuntimeError: a key outside the row map or the tables, or a noise window outside the
            noise table.
    """
    torch.ops.shark.update_rows_(
        weights,
        group_offsets,
        row_map,
        range_ends,
        range_shift,
        keys,
        row_grad,
        step_scale,
        noise_table,
        noise_start,
        dim,
        row_alignment,
    )


@torch.library.register_fake("shark::convert_rows_")
def _convert_rows_fake(dst, dst_at, dst_group, src, src_at, src_group, dim, row_alignment):
    return None


def convert_rows_(
    dst: torch.Tensor,
    dst_at: torch.Tensor,
    dst_group: torch.Tensor,
    src: torch.Tensor,
    src_at: torch.Tensor,
    src_group: torch.Tensor,
    dim: int,
    row_alignment: int,
) -> None:
    """Rows moving between groups: row i is read at byte `src_at[i]` of `src` in group
    `src_group[i]`, decoded to fp32 and written at byte `dst_at[i]` of `dst` in group
    `dst_group[i]`, rounded to nearest (fp16 by conversion; integer rows requantized over their
    range, codes rounded half to even). Every row is read before any is written, so `src` may
    be `dst` (a row entering a group takes the slot another row left). The schema does not
    declare that alias: call it in eager mode, not inside a compiled region.

    Args:
        dst: the uint8 buffer written (group tables as for `mixed_lookup`).
        dst_at, dst_group: [n] int64 byte offset and group (0-4) of each row's new place.
        src: the uint8 buffer read (`dst` itself for a move in place).
        src_at, src_group: [n] int64 byte offset and group (0-4) of each row's old place.
        dim: embedding dim.
        row_alignment: both buffers' row alignment.

    Raises:
        RuntimeError: a group outside 0-4 or a row outside its buffer (nothing is written).
    """
    torch.ops.shark.convert_rows_(dst, dst_at, dst_group, src, src_at, src_group, dim, row_alignment)


@torch.library.register_fake("shark::update_rows_hashed_")
def _update_rows_hashed_fake(
    weights,
    group_offsets,
    row_map,
    range_ends,
    range_shift,
    keys,
    row_grad,
    step_scale,
    table_base,
    table_ids,
    row_offset,
    col_offset,
    noise_head,
    noise_table,
    dim,
    row_alignment,
):
    return None


def update_rows_hashed_(
    weights: torch.Tensor,
    group_offsets: torch.Tensor,
    row_map: torch.Tensor,
    range_ends: torch.Tensor,
    range_shift: torch.Tensor,
    keys: torch.Tensor,
    row_grad: torch.Tensor,
    step_scale: torch.Tensor,
    table_base: torch.Tensor,
    table_ids: torch.Tensor,
    row_offset: torch.Tensor,
    col_offset: torch.Tensor,
    noise_head: int,
    noise_table: torch.Tensor,
    dim: int,
    row_alignment: int,
) -> None:
    """`update_rows_` that hashes each row's rounding noise window itself (the store's CPU
    path): the hash of `rounding_noise_starts`, from the row's local table, global row and
    first global column, computed in the pass over the rows instead of by torch before it.

    Args:
        weights, group_offsets, row_map, range_ends, range_shift, keys, row_grad, step_scale,
            noise_table, dim, row_alignment: as for `update_rows_`.
        table_base: int64 [T + 1], where each local table's rows start in the row map.
        table_ids, row_offset, col_offset: int64 [T], each local table's id, first global row
            and first global column (what the noise hashes).
        noise_head: `shark_torchrec.precision.quantize.noise_head(seed, step)`.

    Raises:
        RuntimeError: a key outside the row map or the group tables (found in the pass: the
            other rows are stepped, as with `update_rows_`), or `table_base` not covering the
            row map.
    """
    torch.ops.shark.update_rows_hashed_(
        weights,
        group_offsets,
        row_map,
        range_ends,
        range_shift,
        keys,
        row_grad,
        step_scale,
        table_base,
        table_ids,
        row_offset,
        col_offset,
        noise_head,
        noise_table,
        dim,
        row_alignment,
    )


@torch.library.register_fake("shark::row_mean_squares")
def _row_mean_squares_fake(rows):
    return rows.new_empty((rows.shape[0],))


def row_mean_squares(rows: torch.Tensor) -> torch.Tensor:
    """Each row's mean square, added in the order torch's CPU sum kernel adds a contiguous row,
    so equal bit for bit to `(rows * rows).mean(dim=1)` where that order holds (torch 2.13).

    Args:
        rows: [n, D] float32, D >= 1.

    Returns:
        [n] float32.
    """
    return torch.ops.shark.row_mean_squares(rows)


_agrees: dict = {}


def fused_backward_agrees(dim: int) -> bool:
    """Whether `row_grads_update_` computes what the separate steps compute on this torch:
    its mean squares (and sums) add a row of `dim` values in torch's order (rows whose values
    span 2^-30 to 2^29, where another order of the additions gives other bits for most rows),
    and torch's sqrt, which the op takes over blocks of rows, gives each value the same bits
    wherever it sits in a tensor (torch 2.13's is MKL's, not correctly rounded). Checked once
    per dim.

    Args:
        dim: the row width.

    Returns:
        True when every row agreed bit for bit: the fused backward may stand in for its
        reference; False (with a warning) when torch adds in another order.
    """
    if dim not in _agrees:
        import warnings

        gen = torch.Generator().manual_seed(dim)
        rows = torch.randn(512, dim, generator=gen) * torch.exp2(
            torch.randint(-30, 30, (512, dim), generator=gen).float()
        )
        ok = torch.equal(row_mean_squares(rows).view(torch.int32), (rows * rows).mean(dim=1).view(torch.int32))
        sums = torch.rand(2053, generator=gen) * torch.exp2(torch.randint(-60, 60, (2053,), generator=gen).float())
        roots = torch.sqrt(sums)
        for start, stop in ((0, 511), (1, 2053), (7, 520), (1500, 2053), (2047, 2050)):
            ok = ok and torch.equal(torch.sqrt(sums[start:stop].clone()), roots[start:stop])
        if not ok:
            warnings.warn(
                f"torch {torch.__version__} sums rows of {dim} values in another order than the fused "
                "backward (shark::row_grads_update_) was written for, or its sqrt depends on where a value "
                "sits: the row update runs as separate ops (same results, slower)",
                stacklevel=2,
            )
        _agrees[dim] = ok
    return _agrees[dim]


@torch.library.register_fake("shark::row_grads_update_")
def _row_grads_update_fake(
    weights,
    group_offsets,
    row_map,
    range_ends,
    range_shift,
    keys,
    grad,
    order,
    counts,
    seg,
    lengths,
    per_sample_weights,
    labels,
    batch_size,
    pooling,
    momentum,
    learning_rate,
    eps,
    table_base,
    table_ids,
    row_offset,
    col_offset,
    noise_head,
    noise_table,
    dim,
    row_alignment,
):
    return grad.new_empty((counts.shape[0],), dtype=torch.float32), grad.new_empty((), dtype=torch.int64)


def row_grads_update_(
    weights: torch.Tensor,
    group_offsets: torch.Tensor,
    row_map: torch.Tensor,
    range_ends: torch.Tensor,
    range_shift: torch.Tensor,
    keys: torch.Tensor,
    grad: torch.Tensor,
    order: torch.Tensor,
    counts: torch.Tensor,
    seg: torch.Tensor,
    lengths: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    labels: Optional[torch.Tensor],
    batch_size: int,
    pooling: int,
    momentum: torch.Tensor,
    learning_rate: float,
    eps: float,
    table_base: torch.Tensor,
    table_ids: torch.Tensor,
    row_offset: torch.Tensor,
    col_offset: torch.Tensor,
    noise_head: int,
    noise_table: torch.Tensor,
    dim: int,
    row_alignment: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """A step's update of every row its batch read, from the output gradient, in one pass:
    per distinct row, its gradient summed over its ids (`row_grads`); the row skipped if that
    is not finite (under Adagrad: its mean square, so also where the square overflows; under
    SGD: its sum); row-wise Adagrad's state and scale (`rowwise_adagrad_scales_`; SGD: the
    learning rate); and the step written back with stochastic rounding
    (`update_rows_hashed_`). No [rows, dim] gradient is made: a block of rows at a time is
    summed into a buffer that stays in cache.

    Args:
        weights, group_offsets, row_map, range_ends, range_shift, table_base, table_ids,
            row_offset, col_offset, noise_head, noise_table, dim, row_alignment: as for
            `update_rows_hashed_`.
        keys: [U] int64, the distinct row keys (`ids_by_row`'s uniq).
        grad, order, counts, seg, lengths, per_sample_weights, labels, batch_size, pooling:
            as for `row_grads` (pooling as `POOLING_CODES`).
        momentum: [rows] float32 row-wise Adagrad state, updated in place; empty for SGD.
        learning_rate, eps: the optimizer's.

    Returns:
        pos ([U] float32, each row's count of positive labels; zeros without labels) and the
        number of rows skipped for a non-finite gradient (a 0-d int64 tensor).

    Raises:
        RuntimeError: arguments `row_grads` or `update_rows_hashed_` refuse, or a key outside
            the Adagrad state.
    """
    return torch.ops.shark.row_grads_update_(
        weights,
        group_offsets,
        row_map,
        range_ends,
        range_shift,
        keys,
        grad,
        order,
        counts,
        seg,
        lengths,
        per_sample_weights,
        labels,
        batch_size,
        pooling,
        momentum,
        learning_rate,
        eps,
        table_base,
        table_ids,
        row_offset,
        col_offset,
        noise_head,
        noise_table,
        dim,
        row_alignment,
    )


@torch.library.register_fake("shark::row_grads")
def _row_grads_fake(grad, order, counts, seg, lengths, per_sample_weights, labels, batch_size, pooling, dim):
    return grad.new_empty((counts.shape[0], dim)), grad.new_empty((counts.shape[0],))


@torch.library.register_fake("shark::ids_by_row")
def _ids_by_row_fake(values, lengths, feature_base, batch_size):
    distinct = torch.library.get_ctx().new_dynamic_size()
    return (
        values.new_empty((values.numel(),), dtype=torch.int64),
        values.new_empty((values.numel(),), dtype=torch.int64),
        values.new_empty((distinct,), dtype=torch.int64),
        values.new_empty((distinct,), dtype=torch.int64),
    )


def ids_by_row(
    values: torch.Tensor, lengths: torch.Tensor, feature_base: torch.Tensor, batch_size: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch's ids grouped by the row they read (row key = the feature's first row + the id).

    Args:
        values: [nnz] ids, feature-major as in a KeyedJaggedTensor.
        lengths: [F * batch_size] ids a bag.
        feature_base: [F] int64, each feature's first row key.
        batch_size: bags a feature.

    Returns:
        seg ([nnz] each id's bag), order ([nnz] the ids sorted by row key, stable), uniq (the
        distinct row keys, ascending) and counts (ids a distinct row), all int64: what
        `torch.repeat_interleave`, `torch.argsort(stable=True)` and `torch.unique_consecutive`
        give, in one pass.
    """
    return torch.ops.shark.ids_by_row(values, lengths, feature_base, batch_size)


@torch.library.register_fake("shark::split_ranking_keys")
def _split_ranking_keys_fake(scores, first_row, out, seen_step=None, step=0, decay=None, divisor=1.0):
    return torch.library.get_ctx().new_dynamic_size()


def split_ranking_keys(
    scores: torch.Tensor,
    first_row: int,
    out: torch.Tensor,
    seen_step: Optional[torch.Tensor] = None,
    step: int = 0,
    decay: Optional[torch.Tensor] = None,
    divisor: float = 1.0,
) -> int:
    """The ranking keys of rows `first_row`.. (`shark_torchrec.precision.priority.ranking_keys`)
    written into `out` as two runs: the keys of +0.0 scores first, ascending, then the others in
    row order.

    Args:
        scores: [n] float32 scores of consecutive rows (with `seen_step`: stored Eq. 7 scores).
        first_row: the global row of the first (rows must stay below 2^32).
        out: [n] int64, written.
        seen_step: None, or int32 [n] the step each score was stored at: the scores are then
            decayed to `step` first (`decayed`, bit for bit).
        step: the step to decay to.
        decay: with `seen_step`, `shark_torchrec.precision.priority.decay_table` of Eq. 7's
            beta, reaching step - min(seen_step) steps.
        divisor: the (decayed) scores are divided by it (`per_byte_scores`: 4 x dim).

    Returns:
        How many zero-score keys lead.
    """
    return torch.ops.shark.split_ranking_keys(scores, first_row, out, seen_step, step, decay, divisor)


@torch.library.register_fake("shark::groups_by_ranking")
def _groups_by_ranking_fake(scores, first_row, cuts, groups, out):
    return None


def groups_by_ranking(scores: torch.Tensor, first_row: int, cuts: List[int], groups: List[int], out: torch.Tensor):
    """Each row's group under the cuts (`shark_torchrec.precision.priority.groups_by_cuts` of the
    rows' ranking keys), written into `out`.

    Args:
        scores: [n] float32 scores of consecutive rows.
        first_row: the global row of the first.
        cuts: non-increasing key cuts, one fewer than `groups`.
        groups: the group ids rows can be in (sorted here: the most precise first, as
            `groups_by_cuts` takes them).
        out: [n] int8, written.
    """
    torch.ops.shark.groups_by_ranking(scores, first_row, list(cuts), sorted(groups), out)


@torch.library.register_fake("shark::changed_rows")
def _changed_rows_fake(row_map, range_ends, groups, num_groups):
    n = torch.library.get_ctx().new_dynamic_size()
    return row_map.new_empty((n,), dtype=torch.int64), row_map.new_empty((num_groups,), dtype=torch.int64)


def changed_rows(
    row_map: torch.Tensor, range_ends: torch.Tensor, groups: torch.Tensor, num_groups: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The rows whose group in a store's row map differs from `groups`, and the row count of
    each group under `groups`, in one pass over the map (`RowGroupStore.set_groups`; its torch
    reference decodes the whole map, `RowGroupStore.decoded_map`).

    Args:
        row_map: int32 [rows], the store's row map.
        range_ends: int32, where each group's map values end (a value's group is the number of
            ends at or below it).
        groups: int8 [rows], the new groups; each must be in [0, num_groups).
        num_groups: how many groups there are.

    Returns:
        (int64 rows that change group, ascending; int64 [num_groups] rows per new group).
    """
    return torch.ops.shark.changed_rows(row_map, range_ends, groups, num_groups)


@torch.library.register_fake("shark::update_priorities_")
def _update_priorities_fake(priority, seen_step, keys, positives, negatives, step, alpha, beta, decay):
    return None


def update_priorities_(
    priority: torch.Tensor,
    seen_step: torch.Tensor,
    keys: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    step: int,
    alpha: float,
    beta: float,
    decay: torch.Tensor,
) -> None:
    """Paper Eq. 7 for the rows `keys` at `step`, in place: each stored score decayed to the step
    before, then (1 - beta) * it + beta * (alpha * positives + negatives), stored with `step`
    (`shark_torchrec.precision.priority.updated`, bit for bit: both read the decay factors
    from `decay_table`).

    Args:
        priority: float32 [rows], the stored scores (written).
        seen_step: int32 [rows], the step each was last updated at (written).
        keys: int64 [n] distinct rows.
        positives, negatives: float32 [n], the rows' positive and negative examples this step.
        step: this step.
        alpha: the weight of a positive example.
        beta: Eq. 7's rate.
        decay: `shark_torchrec.precision.priority.decay_table` of `beta`, reaching
            step - 1 - the keys' oldest seen step.
    """
    torch.ops.shark.update_priorities_(priority, seen_step, keys, positives, negatives, step, alpha, beta, decay)


@torch.library.register_fake("shark::rowwise_adagrad_scales_")
def _rowwise_adagrad_scales_fake(state, keys, mean_sq, learning_rate, eps):
    return mean_sq.new_empty(mean_sq.shape)


def rowwise_adagrad_scales_(
    state: torch.Tensor, keys: torch.Tensor, mean_sq: torch.Tensor, learning_rate: float, eps: float
) -> torch.Tensor:
    """Row-wise Adagrad for the rows `keys`, in place on its state: each row's state grows by its
    gradient's mean square, and its step scale is lr / (sqrt(state) + eps) (FBGEMM's
    EXACT_ROWWISE_ADAGRAD; `RowOptimizer._step_scale`'s torch code, bit for bit).

    Args:
        state: float32 [rows], the rows' Adagrad state (written).
        keys: int64 [n] distinct rows.
        mean_sq: float32 [n], each row's gradient's mean square this step.
        learning_rate: the learning rate.
        eps: Adagrad's epsilon.

    Returns:
        float32 [n], what each row's gradient is multiplied by in this step's update.
    """
    return torch.ops.shark.rowwise_adagrad_scales_(state, keys, mean_sq, learning_rate, eps)

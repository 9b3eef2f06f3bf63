"""Checkpoints on torch.distributed.checkpoint, written atomically.

Layout: CHECKPOINT_DIR/step_00000123/ holds DCP's files plus `meta.json` (progress, table
shapes, config). Every rank writes into `step_00000123.partial-<id>/`; once all ranks are
done, rank 0 writes meta.json and renames the folder. A rename is atomic, so a crash
mid-save leaves only a `.partial-*` folder, which is never loaded and is swept later.

Checksums: before the rename, meta.json records the size and CRC-32 of every file DCP wrote
(`files`). A checkpoint is checked against them when it is chosen (`resolve_checkpoint`): a
directory of checkpoints yields its newest one that passes, warning about each newer one it
skips; a checkpoint named explicitly that fails is an error naming the file. Checkpoints from
before checksums (no `files`) load unchecked. CRC-32 (zlib, several GB/s) is enough: it guards
against truncation and flipped bits, not against tampering.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import uuid
import zlib
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torchrec.modules.embedding_configs import BaseEmbeddingConfig

from shark_torchrec.distributed.mixed_precision import lazy_state_dict, load_state_in_place

log = logging.getLogger("shark")

STEP_DIR = re.compile(r"^step_(\d+)$")
META = "meta.json"
FILES = "files"  # meta.json key: {file name: {"bytes": size, "crc32": 8 hex digits}}
META_VERSION_KEY = "meta_version"
# 2: meta.json carries its version (the package moved train/ -> jobs/; nothing in the file
# names a module, so version 1 files read the same). Raise it when the layout changes.
META_VERSION = 2
_READ_BLOCK = 8 << 20


class CheckpointError(RuntimeError):
    """A checkpoint or run directory that cannot be used as asked; the message names it and why."""


def table_shapes(configs: Mapping[str, BaseEmbeddingConfig]) -> Dict[str, List[int]]:
    """The tables' shapes as a checkpoint's meta.json records them.

    Args:
        configs: table name -> config.

    Returns:
        table name -> [rows, dim], by name.
    """
    return {name: [c.num_embeddings, c.embedding_dim] for name, c in sorted(configs.items())}


def broadcast_str(value: str) -> str:
    """Rank 0's `value` on every rank (collective when the process group has several ranks).

    Args:
        value: this rank's string (only rank 0's is used).

    Returns:
        Rank 0's string.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def list_checkpoints(root: Path) -> List[Path]:
    """The finished checkpoints in a directory (`step_N` folders holding meta.json; unchecked).

    Args:
        root: the checkpoint directory.

    Returns:
        Their folders, oldest step first (empty when `root` is not a directory).
    """
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and (p / META).is_file()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint to load from `path`, checked against its checksums.

    Args:
        path: a checkpoint folder (`step_N`), or a directory of them.

    Returns:
        The folder itself, or the newest checkpoint in the directory that passes its check;
        each newer one that fails is skipped with a warning naming it and why.

    Raises:
        CheckpointError: a checkpoint folder that fails its check (naming the file), or a
        directory without checkpoints or without one that passes.
    """
    p = Path(path)
    if (p / META).is_file():
        problem = checkpoint_problem(p)
        if problem:
            raise CheckpointError(f"checkpoint {p} is corrupt: {problem}")
        return p
    found = list_checkpoints(p)
    if not found:
        hint = ""
        if (p / "checkpoints").is_dir() and list_checkpoints(p / "checkpoints"):
            hint = f": it is a run directory, its checkpoints are in {p / 'checkpoints'}"
        raise CheckpointError(f"no checkpoint found at {p}{hint}")
    for ckpt in reversed(found):
        problem = checkpoint_problem(ckpt)
        if not problem:
            return ckpt
        log.warning("skipping corrupt checkpoint %s: %s", ckpt, problem)
    raise CheckpointError(f"no valid checkpoint at {p}: all {len(found)} fail their check (see the warnings)")


def resolve_checkpoint_on_rank0(path: str | Path) -> Path:
    """`resolve_checkpoint` run by rank 0 alone (checking reads every file) and its answer, or
    its error, given to every rank. Collective: every rank must call it.

    Args:
        path: a checkpoint folder, or a directory of them.

    Returns:
        The checkpoint folder, the same on every rank.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return resolve_checkpoint(path)
    box: List[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", str(resolve_checkpoint(path)))
        except CheckpointError as e:
            box[0] = ("error", str(e))
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise CheckpointError(value)
    return Path(value)


def file_checksums(folder: Path) -> Dict[str, Dict[str, Any]]:
    """Size and CRC-32 of every file in a checkpoint folder, each file read once.

    Args:
        folder: a checkpoint folder, before meta.json is written into it.

    Returns:
        {path relative to `folder`: {"bytes": size, "crc32": 8 hex digits}}.
    """
    return {
        f.relative_to(folder).as_posix(): {"bytes": f.stat().st_size, "crc32": _crc32(f)}
        for f in sorted(folder.rglob("*"))
        if f.is_file()
    }


def checkpoint_problem(path: Path) -> Optional[str]:
    """Why a checkpoint cannot be trusted, or None when it passes (or has no checksums).

    Sizes are compared first (no reading), then each file is read once for its CRC-32. A
    checkpoint this process saved or checked before, with no file changed since (size and
    mtime), is not read again.

    Args:
        path: a checkpoint folder (holding meta.json).

    Returns:
        One line naming the file that fails and how, or None.
    """
    try:
        meta = read_meta(path)
    except (OSError, ValueError) as e:
        return f"{path / META} cannot be read ({e})"
    files = meta.get(FILES) if isinstance(meta, dict) else None
    if files is None:
        return None  # saved before checkpoints carried checksums: loads unchecked
    if not isinstance(files, dict) or not all(
        isinstance(w, dict) and {"bytes", "crc32"} <= w.keys() for w in files.values()
    ):
        return f"{path / META} has a malformed `{FILES}` list"
    signature = _signature(path)
    if _checked.get(str(path.absolute())) == signature:
        return None
    for name, want in sorted(files.items()):
        f = path / name
        if not f.is_file():
            return f"{f} is missing"
        size = f.stat().st_size
        if size != want["bytes"]:
            return f"{f} has {size} bytes, {want['bytes']} were written (truncated or overwritten)"
    for name, want in sorted(files.items()):
        try:
            crc = _crc32(path / name)
        except OSError as e:  # e.g. EIO on a bad sector: as untrustworthy as a wrong sum
            return f"{path / name} cannot be read ({e.strerror or e})"
        if crc != want["crc32"]:
            return f"{path / name} fails its CRC-32 check (its bytes changed after they were written)"
    _checked[str(path.absolute())] = signature
    return None


# Checkpoints known good in this process, by absolute path -> _signature when known good.
_checked: Dict[str, Tuple[Tuple[str, int, int], ...]] = {}


def _signature(path: Path) -> Tuple[Tuple[str, int, int], ...]:
    """Name, size and mtime of every file: any write since changes it."""
    out = []
    for f in sorted(path.rglob("*")):
        if f.is_file():
            st = f.stat()
            out.append((f.relative_to(path).as_posix(), st.st_size, st.st_mtime_ns))
    return tuple(out)


def _crc32(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(_READ_BLOCK):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def save_checkpoint(
    root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: Dict[str, Any],
    keep: int = 2,
) -> Path:
    """Save the model and optimizer state as checkpoint `step_<step>` (see the module doc):
    every rank writes its shards with DCP, then rank 0 writes meta.json with the files'
    checksums, renames the folder into place and removes all but the newest `keep` checkpoints
    and any stale partial folder. Collective: every rank calls it.

    Args:
        root: the checkpoint directory.
        step: the training step the checkpoint is named by (a checkpoint of that step is replaced).
        model, optimizer: what is saved (`lazy_state_dict(model)`: mixed-precision rows decoded a
            block at a time as they are written; `optimizer.state_dict()`).
        meta: what meta.json records besides its version, `step` and `files` (`_meta` of the
            trainer: progress, table shapes, config, schema).
        keep: how many checkpoints to keep (0: all).

    Returns:
        The checkpoint's folder.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    final = root / f"step_{step:08d}"
    tmp = Path(broadcast_str(str(root / f"{final.name}.partial-{uuid.uuid4().hex[:8]}")))
    if rank == 0:
        tmp.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    dcp.save({"model": lazy_state_dict(model), "optim": optimizer.state_dict()}, checkpoint_id=str(tmp))
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        # Every rank's files are complete (barrier): rank 0 reads them once, as they are on disk.
        files = file_checksums(tmp)
        (tmp / META).write_text(
            json.dumps({META_VERSION_KEY: META_VERSION, **meta, "step": step, FILES: files}, indent=2)
        )
        if final.exists():  # re-saving the same step (e.g. final save after a resume)
            shutil.rmtree(final)
        tmp.rename(final)
        _checked[str(final.absolute())] = _signature(final)  # just summed: resolving it needs no re-read
        for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob("step_*.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return final


def read_meta(path: Path) -> Dict[str, Any]:
    """A checkpoint's meta.json, its `meta_version` filled in (1: written before the field
    existed; the layout is the same, and older entries are read as before).

    Args:
        path: a checkpoint folder.

    Returns:
        Its meta.json, as a dict.

    Raises:
        CheckpointError: a meta file of a newer version than this code reads.
    """
    meta = json.loads((path / META).read_text())
    version = meta.setdefault(META_VERSION_KEY, 1)
    if not isinstance(version, int) or version > META_VERSION:
        raise CheckpointError(
            f"checkpoint {path}: {META} has {META_VERSION_KEY} {version!r}; this shark-torchrec reads up to "
            f"{META_VERSION} (written by a newer version?)"
        )
    return meta


def check_tables(path: Path, meta: Dict[str, Any], expected: Dict[str, List[int]]) -> None:
    """Refuse a checkpoint whose tables are not the model's.

    Args:
        path: the checkpoint (for the message).
        meta: its meta.json.
        expected: the model's `table_shapes`.

    Raises:
        CheckpointError: naming the tables missing on either side and those of another shape.
    """
    saved = {k: list(v) for k, v in meta.get("tables", {}).items()}
    if saved == expected:
        return
    problems = []
    missing = sorted(set(expected) - set(saved))
    extra = sorted(set(saved) - set(expected))
    if missing:
        problems.append(f"model tables not in the checkpoint: {', '.join(missing)}")
    if extra:
        problems.append(f"checkpoint tables not in the model: {', '.join(extra)}")
    for t in sorted(set(saved) & set(expected)):
        if saved[t] != expected[t]:
            problems.append(f"table {t}: checkpoint has [rows, dim] = {saved[t]}, model has {expected[t]}")
    raise CheckpointError(f"checkpoint {path} does not match this model: " + "; ".join(problems))


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: Optional[torch.optim.Optimizer],
    expected_tables: Dict[str, List[int]],
    precision: Optional[str] = None,
    optimizer_state: Optional[str] = None,
) -> Dict[str, Any]:
    """Load weights (and optimizer state) in place; refuse other tables by name, and, when
    `precision` is given, a checkpoint trained with another one; when `optimizer_state` is
    given, one whose row-wise Adagrad state was kept in another dtype.

    Collective: every rank calls it (DCP's load).

    Args:
        path: a checkpoint folder (already resolved and checked).
        model: the model, loaded in place.
        optimizer: its optimizer, loaded in place, or None.
        expected_tables: the model's `table_shapes`.
        precision: the model's `--precision`, or None to accept any.
        optimizer_state: the run's `--emb-optimizer-state`, or None to accept any (a
            continued run must keep its checkpoint's: the state would change dtype silently).

    Returns:
        The checkpoint's meta.json.

    Raises:
        CheckpointError: other tables, another precision, or model or optimizer entries the
            checkpoint lacks (nothing is loaded then).
    """
    meta = read_meta(path)
    check_tables(path, meta, expected_tables)
    if precision is not None and saved_precision(meta) != precision:
        raise CheckpointError(
            f"checkpoint {path} was trained with --precision {saved_precision(meta)}, this model is "
            f"--precision {precision}: start from it with --init-from to convert (nothing was loaded)"
        )
    saved_state = meta.get("config", {}).get("train", {}).get("emb_optimizer_state", "fp32")
    if optimizer_state is not None and saved_state != optimizer_state:
        raise CheckpointError(
            f"checkpoint {path} kept row-wise Adagrad's state in {saved_state}, this run asks for "
            f"--emb-optimizer-state {optimizer_state}: continue it with --emb-optimizer-state {saved_state}, "
            "or start from it with --checkpoint to convert (nothing was loaded)"
        )
    # Rows go from the read buffers straight into the stores (no fp32 state dict of them).
    load_state_in_place(
        model,
        lambda state: dcp.load(state, checkpoint_id=str(path), planner=_planner_for(path, state)),
        optimizer,
        check=lambda state: _planner_for(path, state),
    )
    return meta


def _planner_for(path: Path, state: Dict[str, Any]):
    """DCP's load planner for `state`: a strict one, except that a checkpoint written before the
    mixed-precision tables' optimizer state (`<table>.momentum1`) was exposed in
    `fused_optimizer` may lack it; their momentum then comes from the module's own state
    (`momentum`, which such checkpoints hold). Any other missing entry is an error naming it."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    saved = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    flat, _ = flatten_state_dict(state)
    missing = sorted(
        k for k, v in flat.items() if isinstance(v, torch.Tensor) or hasattr(v, "local_shards") if k not in saved
    )
    if not missing:
        return DefaultLoadPlanner()
    tables = {k.rsplit(".", 2)[-2] for k in saved if k.startswith("model.") and k.endswith(".row_group")}
    older = all(k.startswith("optim.") and k.endswith(".momentum1") and k.rsplit(".", 2)[-2] in tables for k in missing)
    if not older:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"checkpoint {path} lacks what this model holds: {shown} (nothing was loaded)")
    return DefaultLoadPlanner(allow_partial_load=True)


def saved_precision(meta: Dict[str, Any]) -> str:
    """The `--precision` a checkpoint was trained with.

    Args:
        meta: its meta.json.

    Returns:
        Its config's `quant.precision` (`fp32` when not recorded).
    """
    return meta.get("config", {}).get("quant", {}).get("precision", "fp32")


def load_weights(
    path: Path,
    model: torch.nn.Module,
    expected_tables: Dict[str, List[int]],
    optimizer: Optional[torch.optim.Optimizer] = None,
) -> Dict[str, Any]:
    """Load the model tensors a checkpoint has (of any precision): how a trained fp32 model
    becomes a mixed-precision one. The values of each row are rounded to nearest into its
    starting group; row groups and scores start as a fresh model's do.

    With `optimizer`, its state comes along where it can: every entry of the same name and
    shape (the dense part's Adagrad state), and each mixed-precision table's row-wise Adagrad
    momentum from the fused optimizer's `momentum1` of the same table. Fine-tuning a trained
    model with fresh Adagrad state would take full-size first steps and undo its training.

    Collective: every rank calls it (DCP's loads).

    Args:
        path: a checkpoint folder (already resolved and checked).
        model: the model, loaded in place.
        expected_tables: the model's `table_shapes`.
        optimizer: the model's optimizer, or None to leave it fresh.

    Returns:
        The checkpoint's meta.json.

    Raises:
        CheckpointError: the checkpoint's tables are not the model's.
    """
    from torch.distributed.checkpoint import FileSystemReader

    meta = read_meta(path)
    check_tables(path, meta, expected_tables)
    saved_meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    saved = set(saved_meta)
    wanted = {k: v for k, v in model.state_dict().items() if f"model.{k}" in saved}
    dcp.load({"model": wanted}, checkpoint_id=str(path))
    model.load_state_dict(wanted, strict=False)
    if optimizer is not None:
        _load_optimizer_matching(path, optimizer, saved_meta)
        _load_mixed_precision_momentum(path, model, saved_meta)
    return meta


def _load_optimizer_matching(path: Path, optimizer, saved_meta) -> None:
    """Optimizer tensors of the same name and shape (not hyper-parameters: this run's flags
    keep theirs). Every rank calls DCP once (it is collective)."""
    state = {"optim": optimizer.state_dict()}
    _load_same_shape(path, state, saved_meta, values=False)
    optimizer.load_state_dict(state["optim"])


def _load_mixed_precision_momentum(path: Path, model: torch.nn.Module, saved_meta) -> None:
    """Row-wise Adagrad momentum of the checkpoint's fused tables into our mixed-precision ones.

    DCP loads are collective, so every rank loads every saved momentum vector, in the same
    order (one table at a time: 4 bytes a row), and keeps the rows its shards hold."""
    from shark_torchrec.distributed.mixed_precision import ShardedMixedPrecisionModule
    from shark_torchrec.modules.mixed_precision import (
        MixedPrecisionEmbeddingBagCollection,
        MixedPrecisionEmbeddingCollection,
    )

    stores, mixed = [], False
    for m in model.modules():
        if isinstance(m, ShardedMixedPrecisionModule):
            stores += [s for s, _ in m.stores()]
            mixed = True
        elif isinstance(m, (MixedPrecisionEmbeddingBagCollection, MixedPrecisionEmbeddingCollection)):
            stores += list(m.stores)
            mixed = True
    if not mixed:
        return
    for key in sorted(k for k in saved_meta if k.startswith("optim.") and k.endswith(".momentum1")):
        table = key.rsplit(".", 2)[-2]
        full = torch.zeros(list(saved_meta[key].size))
        dcp.load({key: full}, checkpoint_id=str(path))
        for store in stores:
            if not store.momentum.numel():
                continue
            for i, t in enumerate(store.tables):
                if t.name == table:
                    lo = int(store.table_base[i])
                    store.momentum[lo : lo + t.rows] = full[t.row_offset : t.row_offset + t.rows]


def load_full_state(path: str | Path) -> Dict[str, Any]:
    """A checkpoint as plain, unsharded tensors (any process, no process group needed).

    Args:
        path: a checkpoint folder, or a directory of them (`resolve_checkpoint`).

    Returns:
        {"model": state dict, "optim": state dict} as saved.
    """
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = resolve_checkpoint(path)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "full.pt"
        dcp_to_torch_save(str(path), str(out))
        return torch.load(out, weights_only=False)


def load_matching(path: Path, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> List[str]:
    """Load every tensor of `model` (and `optimizer`) that the checkpoint has with the same
    shape, resharding as DCP does; return the flattened keys left as they were.

    This is how a pruned model inherits the trained one: kept tables (weights, optimizer
    state, mixed-precision state) and dense layers whose shape did not change.

    Collective: every rank calls it (DCP's load).

    Args:
        path: a checkpoint folder.
        model: the model, loaded in place.
        optimizer: its optimizer, loaded in place, or None.

    Returns:
        The flattened keys (`model.` / `optim.` prefixed) the checkpoint did not fill.
    """
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    state: Dict[str, Any] = {"model": model.state_dict()}
    if optimizer is not None:
        state["optim"] = optimizer.state_dict()
    left = _load_same_shape(path, state, saved, values=True)
    model.load_state_dict(state["model"], strict=False)
    if optimizer is not None:
        optimizer.load_state_dict(state["optim"])
    return left


def _load_same_shape(path: Path, state: Dict[str, Any], saved_meta, values: bool) -> List[str]:
    """Fill `state` (nested, as a state dict) in place from the checkpoint: every tensor saved
    with the same flattened name and shape and, with `values`, every non-tensor entry saved
    under its name. One collective DCP call; returns the flattened keys left as they were."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    flat, mapping = flatten_state_dict(state)
    wanted, left = {}, []
    for key, value in flat.items():
        meta = saved_meta.get(key)
        if (
            isinstance(meta, TensorStorageMetadata)
            and isinstance(value, torch.Tensor)
            and list(meta.size) == list(value.shape)
        ):
            wanted[key] = value
        elif values and isinstance(meta, BytesStorageMetadata) and not isinstance(value, torch.Tensor):
            wanted[key] = value
        else:
            left.append(key)
    dcp.load(wanted, checkpoint_id=str(path), planner=DefaultLoadPlanner(allow_partial_load=True))
    for key, value in wanted.items():
        if not isinstance(value, torch.Tensor):
            # Non-tensor entries (e.g. optimizer hyper-parameters) come back by value.
            _set_nested(state, mapping[key], value)
    return left


def _set_nested(state: Dict[str, Any], path, value: Any) -> None:
    node = state
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value

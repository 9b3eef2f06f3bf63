"""Checkpoints on torch.distributed.checkpoint, written atomically.

Layout: CHECKPOINT_DIR/step_00000123/ holds DCP's files plus `meta.json` (progress, table
shapes, config). Every rank writes into `step_00000123.partial-<id>/`; once all ranks are
done, rank 0 writes meta.json and renames the folder. A rename is atomic, so a crash
mid-save leaves only a `.partial-*` folder, which is never loaded and is swept later.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torchrec.modules.embedding_configs import BaseEmbeddingConfig

STEP_DIR = re.compile(r"^step_(\d+)$")
META = "meta.json"


class CheckpointError(RuntimeError):
    pass


def table_shapes(configs: Mapping[str, BaseEmbeddingConfig]) -> Dict[str, List[int]]:
    return {name: [c.num_embeddings, c.embedding_dim] for name, c in sorted(configs.items())}


def broadcast_str(value: str) -> str:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def list_checkpoints(root: Path) -> List[Path]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and (p / META).is_file()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or the newest one inside a checkpoint directory."""
    p = Path(path)
    if (p / META).is_file():
        return p
    found = list_checkpoints(p)
    if not found:
        raise CheckpointError(f"no checkpoint found at {p}")
    return found[-1]


def save_checkpoint(
    root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: Dict[str, Any],
    keep: int = 2,
) -> Path:
    rank = dist.get_rank() if dist.is_initialized() else 0
    final = root / f"step_{step:08d}"
    tmp = Path(broadcast_str(str(root / f"{final.name}.partial-{uuid.uuid4().hex[:8]}")))
    if rank == 0:
        tmp.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    dcp.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, checkpoint_id=str(tmp))
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        (tmp / META).write_text(json.dumps({**meta, "step": step}, indent=2))
        if final.exists():  # re-saving the same step (e.g. final save after a resume)
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob("step_*.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return final


def read_meta(path: Path) -> Dict[str, Any]:
    return json.loads((path / META).read_text())


def check_tables(path: Path, meta: Dict[str, Any], expected: Dict[str, List[int]]) -> None:
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
) -> Dict[str, Any]:
    """Load weights (and optimizer state) in place; refuse other tables by name, and, when
    `precision` is given, a checkpoint trained with another one."""
    meta = read_meta(path)
    check_tables(path, meta, expected_tables)
    if precision is not None and saved_precision(meta) != precision:
        raise CheckpointError(
            f"checkpoint {path} was trained with --precision {saved_precision(meta)}, this model is "
            f"--precision {precision}: start from it with --init-from to convert (nothing was loaded)"
        )
    state: Dict[str, Any] = {"model": model.state_dict()}
    if optimizer is not None:
        state["optim"] = optimizer.state_dict()
    dcp.load(state, checkpoint_id=str(path))
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optim"])
    return meta


def saved_precision(meta: Dict[str, Any]) -> str:
    return meta.get("config", {}).get("quant", {}).get("precision", "fp32")


def load_weights(
    path: Path, model: torch.nn.Module, expected_tables: Dict[str, List[int]], optimizer: Optional[torch.optim.Optimizer] = None
) -> Dict[str, Any]:
    """Load the model tensors a checkpoint has (of any precision): how a trained fp32 model
    becomes a mixed-precision one. The values of each row are rounded to nearest into its
    starting group; row groups and scores start as a fresh model's do.

    With `optimizer`, its state comes along where it can: every entry of the same name and
    shape (the dense part's Adagrad state), and each mixed-precision table's row-wise Adagrad
    momentum from the fused optimizer's `momentum1` of the same table. Fine-tuning a trained
    model with fresh Adagrad state would take full-size first steps and undo its training."""
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
    from shark_torchrec.modules.mixed_precision import MixedPrecisionEmbeddingBagCollection, MixedPrecisionEmbeddingCollection

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
    """A checkpoint as plain, unsharded tensors (any process, no process group needed)."""
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
        if isinstance(meta, TensorStorageMetadata) and isinstance(value, torch.Tensor) and list(meta.size) == list(value.shape):
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

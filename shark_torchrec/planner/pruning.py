"""The planner hook of F-Permutation: remove pruned tables from a model and its sharding plan.

`prune_tables` takes a trained, sharded model and the fields to remove, and returns a new
DistributedModelParallel model over the kept tables, planned afresh by TorchRec's planner
(with our mixed-precision storage estimator when the model uses that module). The pruned
tables are not in the plan, so they take no memory on any rank.

The new model inherits everything the old one learnt: kept tables with their optimizer state
(and, for mixed-precision tables, row groups and priorities) are resharded through a DCP
checkpoint of the old model; dense layers are copied, the over-arch's first layer restricted to
the interaction columns that remain (`slice`) or the removed fields replaced by their mean
embedding (`constant`). Data that still carries the removed features is accepted: the pruned
model's dataset view drops those columns, and TorchRec's input distribution of the sharded
collection only routes the features it was planned with.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torchrec.distributed.types import ShardingPlan

from shark_torchrec.config import JobConfig
from shark_torchrec.data import Dataset
from shark_torchrec.distributed.env import DistEnv
from shark_torchrec.models.pruned import interaction_columns

OVER_ARCH_INPUT = "model.over_arch.model.0._mlp.0._linear.weight"
CONSTANTS = "model.field_constants"


@dataclass
class PrunedModel:
    cfg: JobConfig
    model: torch.nn.Module
    optimizer: Any
    configs: Dict[str, Any]
    plan: ShardingPlan
    dataset: Dataset


def pruned_config(cfg: JobConfig, fields: Sequence[str], removed: Sequence[str]) -> JobConfig:
    """The config of the model that keeps `fields` minus `removed` (fields in model order)."""
    unknown = set(removed) - set(fields)
    if unknown:
        raise ValueError(f"cannot remove {', '.join(sorted(unknown))}: the model's fields are {', '.join(fields)}")
    kept = [f for f in fields if f not in set(removed)]
    if not kept:
        raise ValueError("pruning would remove every categorical field")
    new = copy.deepcopy(cfg)
    new.model.kept_fields = tuple(kept)
    return new.validate()


def _dense_state(model: torch.nn.Module, optimizer: Any) -> Dict[str, torch.Tensor]:
    """The replicated (plain tensor) entries of model and optimizer, flattened, copied."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    flat, _ = flatten_state_dict({"model": model.state_dict(), "optim": optimizer.state_dict()})
    return {k: v.detach().clone() for k, v in flat.items() if type(v) is torch.Tensor}


def prune_tables(
    model: torch.nn.Module,
    optimizer: Any,
    cfg: JobConfig,
    dataset: Dataset,
    env: DistEnv,
    removed: Sequence[str],
    checkpoint: Path,
    field_means: Optional[Mapping[str, torch.Tensor]] = None,
) -> PrunedModel:
    """Remove the tables of `removed` fields; return the re-planned, re-sharded model.

    `checkpoint` is a saved checkpoint of `model` (its tables travel through it). With
    `cfg.model.field_removal == "constant"`, `field_means` gives E[v] of each removed field.
    """
    from shark_torchrec.train.checkpoint import load_matching
    from shark_torchrec.train.trainer import build_model

    full = dataset.full_schema
    current = list(cfg.model.kept_fields) or list(full.sparse_names)
    new_cfg = pruned_config(cfg, current, removed)
    old = _dense_state(model, optimizer)
    view = dataset.with_fields(list(new_cfg.model.kept_fields))
    dmp, opt, configs, plan = build_model(new_cfg, view, env)
    left = load_matching(checkpoint, dmp, opt)
    _fill_dense(dmp, opt, left, old, full.sparse_names, current, list(new_cfg.model.kept_fields), new_cfg, field_means)
    return PrunedModel(new_cfg, dmp, opt, configs, plan, view)


def _fill_dense(dmp, opt, left: List[str], old: Dict[str, torch.Tensor], fields, current, kept, cfg: JobConfig, field_means) -> None:
    """Fill what changed shape: the over-arch input columns (slice) or the constants."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    state = {"model": dmp.state_dict(), "optim": opt.state_dict()}
    flat, _ = flatten_state_dict(state)
    dim = cfg.model.embedding_dim
    done = set()
    with torch.no_grad():
        for key in left:
            target = flat[key]
            if type(target) is not torch.Tensor:
                continue
            if key.endswith(OVER_ARCH_INPUT) or (key.startswith("optim.") and OVER_ARCH_INPUT[len("model."):] in key and key.endswith(".sum")):
                cols = interaction_columns(dim, current, kept)
                target.copy_(old[key][:, cols])
                done.add(key)
            elif key.endswith(CONSTANTS):
                removed_now = [f for f in fields if f not in set(kept)]
                removed_before = [f for f in fields if f not in set(current)]
                rows = []
                for f in removed_now:
                    if f in removed_before:
                        rows.append(old[key][removed_before.index(f)])
                    else:
                        if field_means is None or f not in field_means:
                            raise ValueError(f"constant removal of {f!r} needs its mean embedding E[v]")
                        rows.append(field_means[f].to(target.dtype))
                target.copy_(torch.stack(rows))
                done.add(key)
    missing = [k for k in left if k not in done and type(flat[k]) is torch.Tensor and not k.endswith(".step")]
    if missing:
        raise RuntimeError(f"pruning left tensors without a value: {', '.join(missing[:5])}")
    dmp.load_state_dict(state["model"], strict=False)
    opt.load_state_dict(state["optim"])

"""F-Permutation's planner hook at work: a trained, sharded model and the fields to remove in,
a new DistributedModelParallel model over the kept tables out, planned afresh by TorchRec's
planner (with our mixed-precision storage estimator when the model uses that module). The
pruned tables are not in the plan, so they take no memory on any rank.

The new model inherits everything the old one learnt: kept tables with their optimizer state
(and, for mixed-precision tables, row groups and priorities) are resharded through a DCP
checkpoint of the old model; dense layers are copied (`shark_torchrec.planner.table_removal`).
Data that still carries the removed features is accepted: the pruned model's dataset view
drops those columns, and TorchRec's input distribution of the sharded collection only routes
the features it was planned with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

import torch
from torchrec.distributed.types import ShardingPlan

from shark_torchrec.config import JobConfig
from shark_torchrec.data import Dataset
from shark_torchrec.distributed.env import DistEnv
from shark_torchrec.jobs.checkpoint import load_matching
from shark_torchrec.jobs.trainer import build_sharded_model
from shark_torchrec.planner.table_removal import dense_state, fill_dense, pruned_config


@dataclass
class PrunedModel:
    """A model with fields removed: its config (kept fields), the sharded model and optimizer,
    the tables' configs, the sharding plan, and the data view over the kept fields."""

    cfg: JobConfig
    model: torch.nn.Module
    optimizer: Any
    configs: Dict[str, Any]
    plan: ShardingPlan
    dataset: Dataset


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

    Args:
        model, optimizer: the trained sharded model and its optimizer.
        cfg: the config `model` was built from.
        dataset: its data (a view over its kept fields, or the full data).
        env: the ranks.
        removed: the fields to remove (of the model's kept fields).
        checkpoint: a saved checkpoint of `model`: its tables travel through it.
        field_means: with `cfg.model.field_removal == "constant"`, E[v] of each removed field.

    Returns:
        The pruned model, with everything the old one learnt for the kept fields.
    """
    full = dataset.full_schema
    current = list(cfg.model.kept_fields) or list(full.sparse_names)
    new_cfg = pruned_config(cfg, current, removed)
    old = dense_state(model, optimizer)
    view = dataset.with_fields(list(new_cfg.model.kept_fields))
    dmp, opt, configs, plan = build_sharded_model(new_cfg, view, env)
    left = load_matching(checkpoint, dmp, opt)
    fill_dense(dmp, opt, left, old, full.sparse_names, current, list(new_cfg.model.kept_fields), new_cfg, field_means)
    return PrunedModel(new_cfg, dmp, opt, configs, plan, view)

"""The planner's side of F-Permutation's table removal: the config of the model that keeps
fewer fields (`pruned_config`), and the dense layers carried over to the rebuilt model
(`dense_state`, `fill_dense`): the over-arch's first layer restricted to the interaction
columns that remain (`slice`), or the removed fields replaced by their mean embedding
(`constant`). `shark_torchrec.jobs.remove_tables.prune_tables` rebuilds the sharded model over
the kept tables with these, planned afresh by TorchRec's planner (with our mixed-precision
storage estimator), so the pruned tables take no memory on any rank.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Sequence

import torch

from shark_torchrec.config import JobConfig
from shark_torchrec.models.pruned import interaction_columns

OVER_ARCH_INPUT = "model.over_arch.model.0._mlp.0._linear.weight"
CONSTANTS = "model.field_constants"


def pruned_config(cfg: JobConfig, fields: Sequence[str], removed: Sequence[str]) -> JobConfig:
    """The config of the model that keeps `fields` minus `removed` (fields in model order).

    Args:
        cfg: the current model's config.
        fields: the current model's fields.
        removed: the fields to remove.

    Returns:
        A validated copy of `cfg` whose `model.kept_fields` are the rest.

    Raises:
        ValueError: a removed field the model does not have, or no field left.
    """
    unknown = set(removed) - set(fields)
    if unknown:
        raise ValueError(f"cannot remove {', '.join(sorted(unknown))}: the model's fields are {', '.join(fields)}")
    kept = [f for f in fields if f not in set(removed)]
    if not kept:
        raise ValueError("pruning would remove every categorical field")
    new = copy.deepcopy(cfg)
    new.model.kept_fields = tuple(kept)
    return new.validate()


def dense_state(model: torch.nn.Module, optimizer: Any) -> Dict[str, torch.Tensor]:
    """The replicated (plain tensor) entries of model and optimizer, flattened, copied: what
    `fill_dense` takes the dense layers from once the model is rebuilt.

    Args:
        model: the sharded model.
        optimizer: its optimizer.

    Returns:
        flattened key (`model.` / `optim.` prefixed) -> a copy of the tensor.
    """
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    flat, _ = flatten_state_dict({"model": model.state_dict(), "optim": optimizer.state_dict()})
    return {k: v.detach().clone() for k, v in flat.items() if type(v) is torch.Tensor}


def fill_dense(
    dmp, opt, left: List[str], old: Dict[str, torch.Tensor], fields, current, kept, cfg: JobConfig, field_means
) -> None:
    """After the kept tables were loaded into the rebuilt model `dmp` (`left`: the keys the
    checkpoint did not fill), fill what changed shape from the old model's `dense_state`: the
    over-arch input columns (slice) or the removed fields' constants, then the rest as it was.

    Args:
        dmp, opt: the rebuilt model and its optimizer, filled in place.
        left: the flattened keys `load_matching` did not fill.
        old: the old model's `dense_state`.
        fields: every categorical field of the data, in order.
        current: the old model's fields.
        kept: the new model's fields.
        cfg: the new model's config (its embedding dim).
        field_means: E[v] of each field removed now (needed with `constant` removal).

    Raises:
        ValueError: a field removed by `constant` removal without its mean.
        RuntimeError: a tensor left without a value.
    """
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
            if key.endswith(OVER_ARCH_INPUT) or (
                key.startswith("optim.") and OVER_ARCH_INPUT[len("model.") :] in key and key.endswith(".sum")
            ):
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

"""From a checkpoint to models for serving: the trained model unsharded, and its inference twin.

Everything comes from the checkpoint alone (its config, table shapes and the data schema in
`meta.json`, and the DCP tensors), so a model can be exported where the training data is not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Tuple

import torch

from shark_torchrec.config import JobConfig, config_from_dict
from shark_torchrec.data.schema import Schema
from shark_torchrec.models.dlrm import DLRMTrainModule, build_dlrm, table_configs
from shark_torchrec.models.pruned import kept_schema
from shark_torchrec.modules.inference import MixedPrecisionInferenceEmbeddingBagCollection
from shark_torchrec.modules.mixed_precision import MixedPrecisionEmbeddingBagCollection
from shark_torchrec.train.checkpoint import CheckpointError, load_full_state, read_meta, resolve_checkpoint


def load_trained_model(path: str | Path) -> Tuple[DLRMTrainModule, JobConfig]:
    """The checkpoint's model, unsharded on CPU, in eval mode."""
    path = resolve_checkpoint(path)
    meta = read_meta(path)
    if "schema" not in meta:
        raise CheckpointError(f"checkpoint {path} predates export support (its meta.json has no schema)")
    cfg = config_from_dict(meta["config"], where=f"{path}/meta.json")
    schema = Schema(**meta["schema"])
    kept = kept_schema(schema, list(cfg.model.kept_fields) or schema.sparse_names)
    ebc = None
    if cfg.quant.precision != "fp32":
        t = cfg.train
        ebc = MixedPrecisionEmbeddingBagCollection(
            tables=table_configs(kept, cfg.model.embedding_dim),
            precision_policy=cfg.quant.policy(t.lr, t.eps, t.seed, t.emb_optimizer),
            device=torch.device("cpu"),
        )
    model = build_dlrm(schema, cfg.model, ebc=ebc, seed=cfg.train.seed)
    if ebc is None:  # stock tables: materialize them on CPU to take the weights
        model = _materialized(model)
    state = load_full_state(path)["model"]
    model.load_state_dict(state, strict=True)
    return model.eval(), cfg


def _materialized(model: torch.nn.Module) -> torch.nn.Module:
    for m in model.modules():
        for pname, p in list(m.named_parameters(recurse=False)):
            if p.is_meta:
                setattr(m, pname, torch.nn.Parameter(torch.empty(p.shape), requires_grad=p.requires_grad))
    return model


def export_inference_model(path: str | Path) -> Tuple[DLRMTrainModule, JobConfig]:
    """The checkpoint's model with its mixed-precision collection replaced by
    `MixedPrecisionInferenceEmbeddingBagCollection` (same rows, same groups, no training state)."""
    model, cfg = load_trained_model(path)
    if cfg.quant.precision == "fp32":
        raise CheckpointError(
            f"checkpoint {path} holds fp32 TorchRec tables: there are no row groups to export "
            "(TorchRec's quantize_embeddings serves such a model)"
        )
    return to_inference(model), cfg


def to_inference(model: DLRMTrainModule) -> DLRMTrainModule:
    """Swap a loaded mixed-precision model's collection for its inference twin, in place (the
    training store, with its scores and optimizer state, is dropped)."""
    sparse_arch = model.model.sparse_arch
    sparse_arch.embedding_bag_collection = MixedPrecisionInferenceEmbeddingBagCollection.from_trained(
        sparse_arch.embedding_bag_collection
    )
    return model.eval()

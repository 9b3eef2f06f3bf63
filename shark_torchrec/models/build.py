"""The one place a job's config becomes a model: the unsharded DLRM over the data's fields,
its embedding tables stock TorchRec (fp32) or our mixed-precision collection. Training shards
it (`shark_torchrec.jobs.trainer.build_sharded_model`); export loads a checkpoint into it."""

from __future__ import annotations

from typing import Optional

import torch

from shark_torchrec.config import JobConfig
from shark_torchrec.data.schema import Schema, kept_schema
from shark_torchrec.models.dlrm import DLRMTrainModule, build_dlrm, table_configs
from shark_torchrec.modules.mixed_precision import MixedPrecisionEmbeddingBagCollection


def model_from_config(cfg: JobConfig, schema: Schema, device: Optional[torch.device] = None) -> DLRMTrainModule:
    """The DLRM `cfg` describes, unsharded.

    Args:
        cfg: the job's config (model shape, kept fields, precision, and the optimizer settings
            a mixed-precision collection trains its rows with).
        schema: the data's full field list; `cfg.model.kept_fields` picks the tables.
        device: where a mixed-precision collection keeps its rows (None: its default). Stock
            tables stay on the meta device until sharding (or export) materialises them.

    Returns:
        The model, its dense weights initialised from `cfg.train.seed`.
    """
    kept = kept_schema(schema, list(cfg.model.kept_fields) or schema.sparse_names)
    ebc = None
    if cfg.quant.precision != "fp32":
        t = cfg.train
        ebc = MixedPrecisionEmbeddingBagCollection(
            tables=table_configs(kept, cfg.model.embedding_dim),
            precision_policy=cfg.quant.policy(t.lr, t.eps, t.seed, t.emb_optimizer, t.emb_optimizer_state),
            device=device,
        )
    return build_dlrm(schema, cfg.model, ebc=ebc, seed=cfg.train.seed)

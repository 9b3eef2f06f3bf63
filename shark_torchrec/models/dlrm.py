"""TorchRec's DLRM (or DLRM_DCN) over an EmbeddingBagCollection, with a weighted loss."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.models.dlrm import DLRM, DLRM_DCN
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from shark_torchrec.config import ModelConfig
from shark_torchrec.data.batch import Batch
from shark_torchrec.data.schema import Schema


def table_configs(schema: Schema, embedding_dim: int) -> List[EmbeddingBagConfig]:
    """One table per categorical field, named `t_<field>`.

    Args:
        schema: the fields and their table sizes.
        embedding_dim: every table's dim.

    Returns:
        The tables' configs (sum pooling), in the schema's field order.
    """
    return [
        EmbeddingBagConfig(
            name=Schema.table_name(f),
            embedding_dim=embedding_dim,
            num_embeddings=n,
            feature_names=[f],
        )
        for f, n in zip(schema.sparse_names, schema.num_embeddings)
    ]


class DLRMTrainModule(nn.Module):
    """Wraps a DLRM and returns `(loss, (loss, logits, labels, sample_weights))`.

    The loss is the sum of per-sample BCE over the real samples divided by the (fixed) local
    batch size, not by the count of real samples: then padding and skipped lines change no
    weighting, and the gradient averaged over N ranks equals the single-process gradient of
    the same global batch exactly.
    """

    def __init__(self, model: DLRM) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
        logits = self.model(batch.dense_features, batch.sparse_features).squeeze(-1)
        per_sample = F.binary_cross_entropy_with_logits(logits, batch.labels, reduction="none")
        loss = (per_sample * batch.sample_weights).sum() / batch.sample_weights.numel()
        return loss, (loss.detach(), logits.detach(), batch.labels, batch.sample_weights)


def build_dlrm(
    schema: Schema,
    cfg: ModelConfig,
    ebc: Optional[EmbeddingBagCollection] = None,
    seed: int = 0,
) -> DLRMTrainModule:
    """Build the model; the EBC is on the meta device (DMP materialises it, sharded).

    Dense weights are initialised from `seed`, so every rank and every world size starts
    from the same dense model. With `cfg.kept_fields`, `schema` is still the full one and the
    model is the pruned DLRM over the kept fields (`ebc`, if given, holds only those).

    Args:
        schema: the data's full schema.
        cfg: the `[model]` group (`arch`, layer sizes, kept fields and how removed ones left).
        ebc: the embedding collection to use (e.g. our mixed-precision one); default: stock
            TorchRec tables on the meta device.
        seed: the seed of the dense weights.

    Returns:
        The DLRM (or DLRM_DCN; `DLRMWithConstantFields` for a `constant` pruned model) in a
        `DLRMTrainModule`.
    """
    if cfg.kept_fields:
        return _build_pruned(schema, cfg, ebc, seed)
    return DLRMTrainModule(_build(schema, cfg, ebc, seed))


def _build_pruned(schema: Schema, cfg: ModelConfig, ebc, seed: int) -> DLRMTrainModule:
    from shark_torchrec.data.schema import kept_schema
    from shark_torchrec.models.pruned import DLRMWithConstantFields

    kept = kept_schema(schema, cfg.kept_fields)
    kept_model = _build(kept, cfg, ebc, seed)
    if cfg.field_removal == "slice":
        return DLRMTrainModule(kept_model)
    full_model = _build(schema, cfg, None, seed)
    return DLRMTrainModule(DLRMWithConstantFields(kept_model, full_model, schema.sparse_names, kept.sparse_names))


def _build(schema: Schema, cfg: ModelConfig, ebc: Optional[EmbeddingBagCollection], seed: int):
    if ebc is None:
        ebc = EmbeddingBagCollection(tables=table_configs(schema, cfg.embedding_dim), device=torch.device("meta"))
    torch.manual_seed(seed)
    dense = [*cfg.dense_arch, cfg.embedding_dim]
    over = [*cfg.over_arch, 1]
    if cfg.arch == "dlrm_dcn":
        model = DLRM_DCN(
            embedding_bag_collection=ebc,
            dense_in_features=schema.num_dense,
            dense_arch_layer_sizes=dense,
            over_arch_layer_sizes=over,
            dcn_num_layers=cfg.dcn_num_layers,
            dcn_low_rank_dim=cfg.dcn_low_rank_dim,
        )
    else:
        model = DLRM(
            embedding_bag_collection=ebc,
            dense_in_features=schema.num_dense,
            dense_arch_layer_sizes=dense,
            over_arch_layer_sizes=over,
        )
    return model

"""DLRM with feature fields removed (F-Permutation's pruned models), unsharded.

Two ways to take a field out of a trained DLRM without re-initialising anything:

- `slice`: a plain TorchRec DLRM over the kept tables. The dot interaction's output is the
  dense vector plus one column per pair of fields; the over-arch's first layer keeps the
  columns of the pairs that remain (`interaction_columns`) and drops the rest, which is
  exactly the old model with the removed field's interactions set to zero.
- `constant`: `DLRMWithConstantFields` keeps the old interaction and over-arch and feeds each
  removed field its mean pooled embedding E[v_i] (a D-float buffer, no table): the model
  the first-order Taylor score assumes. Works for DLRM_DCN too.

The dense-feature field is never removed: it holds no embedding memory.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
from torchrec.models.dlrm import DLRM


def interaction_columns(dense_dim: int, fields: Sequence[str], kept: Sequence[str]) -> List[int]:
    """Columns of the old DLRM interaction output that the model over `kept` still produces.

    The output is [dense (dense_dim values), dot(i, j) for i < j over (dense, *fields)], the
    pairs in row-major upper-triangle order.

    Args:
        dense_dim: the dense vector's width (the embedding dim).
        fields: the old model's categorical fields, in its order.
        kept: the fields the new model keeps, in the same order.

    Returns:
        The old columns, in the new model's column order.
    """
    n = len(fields) + 1
    pair_col = {}
    for c, (i, j) in enumerate(zip(*torch.triu_indices(n, n, offset=1).tolist())):
        pair_col[(i, j)] = dense_dim + c
    old = [0] + [1 + fields.index(f) for f in kept]  # combined positions, dense first
    m = len(old)
    cols = list(range(dense_dim))
    for i, j in zip(*torch.triu_indices(m, m, offset=1).tolist()):
        cols.append(pair_col[(old[i], old[j])])
    return cols


def fill_constant_fields(sparse: torch.Tensor, constants: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """The pooled kept fields with the removed fields' constant vectors put in their places.

    Args:
        sparse: [B, kept, D] pooled embeddings of the kept fields.
        constants: [removed, D] one vector per removed field.
        order: [all fields] position of every original field in [kept..., removed...].

    Returns:
        [B, all fields, D] in the original field order. (Shared by the model and its serving
        export, so both compute exactly the same.)
    """
    consts = constants.to(sparse.dtype)[None].expand(sparse.shape[0], -1, -1)
    return torch.cat([sparse, consts], 1).index_select(1, order)


class DLRMWithConstantFields(DLRM):
    """A DLRM whose embedding collection holds only the kept fields; the removed ones enter
    the interaction as constant vectors (`field_constants`, one row per removed field)."""

    def __init__(self, kept_model: DLRM, full_model: DLRM, fields: Sequence[str], kept: Sequence[str]) -> None:
        torch.nn.Module.__init__(self)
        self.dense_arch = full_model.dense_arch
        self.sparse_arch = kept_model.sparse_arch
        self.inter_arch = full_model.inter_arch
        self.over_arch = full_model.over_arch
        self.all_fields = list(fields)
        self.removed_fields = [f for f in fields if f not in set(kept)]
        order = list(kept) + self.removed_fields
        # Position of every original field in [kept..., removed...], for one gather.
        self.register_buffer("_order", torch.tensor([order.index(f) for f in fields]), persistent=False)
        dim = full_model.sparse_arch.D
        self.register_buffer("field_constants", torch.zeros(len(self.removed_fields), dim))

    def fill_removed(self, sparse: torch.Tensor) -> torch.Tensor:
        """[B, kept, D] -> [B, all fields, D] with the constants in the removed slots.

        Args:
            sparse: [B, kept, D] pooled embeddings of the kept fields, in the kept model's order.

        Returns:
            [B, all fields, D] in the original field order.
        """
        return fill_constant_fields(sparse, self.field_constants, self._order)

    def forward(self, dense_features: torch.Tensor, sparse_features) -> torch.Tensor:
        embedded_dense = self.dense_arch(dense_features)
        embedded_sparse = self.fill_removed(self.sparse_arch(sparse_features))
        concatenated = self.inter_arch(dense_features=embedded_dense, sparse_features=embedded_sparse)
        return self.over_arch(concatenated)
